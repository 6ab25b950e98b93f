//! One connection: dial (TCP, TLS, WebSocket upgrade), handshake, then serve until it ends.
//!
//! The serving loop owns the socket. It waits for whichever comes first — an inbound frame, a
//! reply from a request task, a change of the announced ports, a frame of session output from
//! the durable outbox, the heartbeat/liveness timer, or shutdown — and handles it, so nothing
//! else ever touches the socket. Request handlers run as their own tasks (at most
//! [`MAX_IN_FLIGHT`] at once) and hand their replies back over a channel; when the link ends
//! the channel closes and late replies are dropped (their outcomes are in the journal if they
//! mutated anything, so a re-send is answered). Session output is pulled from the durable
//! outbox, which keeps each frame until it is acknowledged, so a frame lost with the link is
//! sent again on the next one.
//!
//! Pongs: tungstenite queues the pong for an inbound ping and writes it on the next read or
//! write; the loop polls the socket again right after every event, so the pong is flushed
//! without waiting for other traffic.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::{self, Message as WsMessage};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use codemantle_protocol::codec::{self, Codec};
use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::handshake::{
    CLOSE_POLICY_VIOLATION, CLOSE_PROTOCOL_ERROR, ClientHandshake, H2Fields, SessionParams,
};
use codemantle_protocol::message::{Hello, Message, PortList};
use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::{FutureExt as _, StreamExt as _};

use super::{Shutdown, Tunnel, TunnelEvent, tls};
use crate::dispatch::{Outbound, Peer, shape_reply};

/// Requests handled at once per link; more wait (the loop stops reading until one finishes).
pub const MAX_IN_FLIGHT: usize = 64;

/// How long a graceful close may take at shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How a link (or an attempt at one) ended.
#[derive(Debug)]
pub(super) enum LinkEnd {
    /// Shutdown was requested (the socket was closed with 1000 if it was up).
    Shutdown,
    /// The control plane speaks only JSON: dial again in JSON.
    Fallback,
    /// The control plane refused this device; retrying soon cannot help.
    Rejected { code: String, reason: String },
    /// The attempt failed before the link was authenticated.
    Failed { reason: String },
    /// An authenticated link ended.
    Closed {
        connected_at: Instant,
        reason: String,
    },
}

/// The byte stream under the WebSocket: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

/// Small buffers: an idle daemon should stay within a few MiB. Messages may still be as large as
/// the codec allows; buffers grow for them and shrink back.
fn ws_config(codec: Codec) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(codec.max_frame_bytes()))
        .max_frame_size(Some(codec.max_frame_bytes()))
}

impl Tunnel {
    /// Dial, authenticate and serve one link.
    pub(super) async fn link_once(&self, codec: Codec, shutdown: &Shutdown) -> LinkEnd {
        let timeout = Duration::from_secs(self.config.handshake_timeout_s);
        let deadline = Instant::now() + timeout;
        let attempt = async {
            let mut ws = self.dial(codec).await?;
            let session = self.handshake(&mut ws, codec).await?;
            Ok::<_, LinkEnd>((ws, session))
        };
        let timed_out = async {
            smol::Timer::at(deadline).await;
            Err(LinkEnd::Failed {
                reason: format!(
                    "no handshake within handshake_timeout_s ({} s) — is server.url a CodeMantle control plane, and reachable?",
                    timeout.as_secs()
                ),
            })
        };
        let (ws, session) = match attempt.or(timed_out).await {
            Ok(up) => up,
            Err(end) => return end,
        };
        tracing::info!(
            sid = %session.sid,
            hb = session.heartbeat_secs,
            mx = session.max_chunk_bytes,
            codec = ?codec,
            "handshake complete sid={} hb={}s mx={}",
            session.sid,
            session.heartbeat_secs,
            session.max_chunk_bytes
        );
        self.emit(TunnelEvent::Connected {
            sid: session.sid.clone(),
            hb: session.heartbeat_secs,
            codec,
        });
        self.serve(ws, codec, session, shutdown).await
    }

    /// TCP, TLS for `wss://`, WebSocket upgrade.
    async fn dial(&self, codec: Codec) -> Result<Ws, LinkEnd> {
        let url = &self.config.server.url;
        let failed = |what: String| LinkEnd::Failed { reason: what };
        let tcp = smol::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| failed(format!("cannot connect to {}:{}: {e}", url.host, url.port)))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            Some(config) => {
                let name = tls::server_name(&url.host).map_err(failed)?;
                let tls = futures_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        failed(format!(
                            "TLS with {} failed: {e} — check server.ca_file / server.pin_sha256 and the server's certificate",
                            url.host
                        ))
                    })?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let (ws, _response) = async_tungstenite::client_async_with_config(
            url.raw.as_str(),
            io,
            Some(ws_config(codec)),
        )
        .await
        .map_err(|e| failed(format!("WebSocket upgrade at {url} failed: {e}")))?;
        Ok(ws)
    }

    /// Send `h1`, wait for `h2` and check it.
    async fn handshake(&self, ws: &mut Ws, codec: Codec) -> Result<SessionParams, LinkEnd> {
        let nonce = fresh_nonce().map_err(|reason| LinkEnd::Failed { reason })?;
        let (client, h1) =
            ClientHandshake::new(self.key.expose(), &self.config.device.id, &nonce, now_ms())
                .map_err(|e| LinkEnd::Failed {
                    reason: format!("cannot build the handshake: {e}"),
                })?;
        let hello = Message::Hello(Hello {
            device_id: h1.device_id,
            auth_token: None,
            key_id: Some(h1.key_id),
            nonce: h1.nonce,
            timestamp_ms: h1.ts_ms,
            mac: h1.mac,
            fingerprint: Some(self.facts.fingerprint()),
            hostname: self.facts.hostname.clone(),
            os: Some(self.facts.os.clone()),
            agent_version: Some(self.facts.agent_version.clone()),
        });
        send(ws, &hello, codec)
            .await
            .map_err(|reason| LinkEnd::Failed { reason })?;
        tracing::debug!(device = %self.config.device.id, ?codec, "connected, sent handshake");

        loop {
            let frame = match ws.next().await {
                None => {
                    return Err(LinkEnd::Failed {
                        reason: "the control plane closed the connection during the handshake"
                            .to_owned(),
                    });
                }
                Some(Err(e)) => {
                    return Err(LinkEnd::Failed {
                        reason: format!("connection error during the handshake: {e}"),
                    });
                }
                Some(Ok(frame)) => frame,
            };
            let msg = match frame {
                WsMessage::Text(_) if codec == Codec::Cbor => return Err(LinkEnd::Fallback),
                WsMessage::Close(close) => {
                    return Err(self.closed_in_handshake(close.as_ref(), codec));
                }
                WsMessage::Text(text) => codec::decode(text.as_bytes(), Codec::Json),
                WsMessage::Binary(bytes) => codec::decode(&bytes, codec),
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
            };
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::debug!("undecodable frame during the handshake: {e}");
                    continue;
                }
            };
            match msg {
                Message::HelloAck(h2) => {
                    let fields = H2Fields {
                        sid: &h2.connection_id,
                        server_nonce: &h2.nonce,
                        hb: u64::from(h2.heartbeat_secs),
                        mx: u64::from(h2.max_chunk),
                        mac: &h2.mac,
                    };
                    return match client.handle_h2(&fields) {
                        Ok(session) => Ok(session),
                        Err(e) => {
                            close(ws, e.close_code(), e.close_reason()).await;
                            Err(LinkEnd::Failed {
                                reason: format!(
                                    "the control plane's h2 was refused ({e}): it does not prove it holds this device's key — check that server.url is the right control plane and the key matches"
                                ),
                            })
                        }
                    };
                }
                Message::Error(e) => {
                    return Err(match e.code {
                        ErrorCode::Proto if codec == Codec::Cbor => LinkEnd::Fallback,
                        ErrorCode::Auth => {
                            close(ws, CLOSE_POLICY_VIOLATION, "auth failed").await;
                            LinkEnd::Rejected {
                                code: "AUTH".to_owned(),
                                reason: format!(
                                    "the control plane rejected this device's key (e AUTH{}): check that device.id ({}) and device.key_file match the `codemantle device add` output for this device, and that the host clock is right (±30 s)",
                                    detail(e.message.as_deref()),
                                    self.config.device.id
                                ),
                            }
                        }
                        ErrorCode::UpdateRequired => {
                            close(ws, CLOSE_POLICY_VIOLATION, "update required").await;
                            LinkEnd::Rejected {
                                code: "UPDATE_REQUIRED".to_owned(),
                                reason: format!(
                                    "the control plane requires a newer daemon (e UPDATE_REQUIRED{}): upgrade codemantle-daemon on this host (this is {})",
                                    detail(e.message.as_deref()),
                                    env!("CARGO_PKG_VERSION")
                                ),
                            }
                        }
                        other => LinkEnd::Failed {
                            reason: format!(
                                "the control plane answered the handshake with e {}{}",
                                other.as_str(),
                                detail(e.message.as_deref())
                            ),
                        },
                    });
                }
                // 0.1.50 ignores everything else before h2.
                other => tracing::debug!(t = other.type_tag(), "ignored before the handshake"),
            }
        }
    }

    fn closed_in_handshake(&self, close: Option<&CloseFrame>, codec: Codec) -> LinkEnd {
        let code = close.map(|c| u16::from(c.code));
        let reason = close
            .map(|c| c.reason.as_str().to_owned())
            .unwrap_or_default();
        match code {
            Some(CLOSE_PROTOCOL_ERROR) if codec == Codec::Cbor => LinkEnd::Fallback,
            Some(CLOSE_POLICY_VIOLATION) => LinkEnd::Rejected {
                code: "1008".to_owned(),
                reason: format!(
                    "the control plane refused the handshake (close 1008 {reason:?}): check that device.id ({}) and device.key_file match the `codemantle device add` output for this device",
                    self.config.device.id
                ),
            },
            _ => LinkEnd::Failed {
                reason: format!(
                    "the control plane closed the connection during the handshake (code {}, {reason:?})",
                    code.map_or_else(|| "none".to_owned(), |c| c.to_string())
                ),
            },
        }
    }

    /// Serve an authenticated link until it ends.
    async fn serve(
        &self,
        mut ws: Ws,
        codec: Codec,
        session: SessionParams,
        shutdown: &Shutdown,
    ) -> LinkEnd {
        let connected_at = Instant::now();
        let closed = |reason: String| LinkEnd::Closed {
            connected_at,
            reason,
        };
        let hb = Duration::from_secs(session.heartbeat_secs);
        let dead_after = hb * 3;
        let (reply_tx, reply_rx) = async_channel::unbounded::<Message>();
        // Handlers queue frames they send while running (git's `gq` lines) on the reply
        // channel too, so they go out in order and before the reply.
        // Proxied response bodies go through a bounded lane: a pump waits while it is full.
        let (lane_tx, lane_rx) =
            async_channel::bounded::<Message>(crate::proxy::STREAM_LANE_FRAMES);
        let peer = Peer {
            codec,
            sid: session.sid,
            outbound: Some(Outbound::new(reply_tx.clone()).with_stream_lane(lane_tx)),
        };
        let permits = Arc::new(smol::lock::Semaphore::new(MAX_IN_FLIGHT));

        // Telemetry right away, and the announced ports if there are any.
        if let Err(e) = send(
            &mut ws,
            &Message::Telemetry(super::telemetry(self.started)),
            codec,
        )
        .await
        {
            return closed(e);
        }
        let mut announced: Vec<u16> = Vec::new();
        let ports = self.ports.get();
        if !ports.is_empty() {
            if let Err(e) = send_ports(&mut ws, &ports, codec).await {
                return closed(e);
            }
            announced = ports;
        }

        // Session output the previous link did not get acknowledged goes out again first.
        if let Some(outbox) = &self.outbox {
            outbox.link_up();
        }

        let mut last_rx = Instant::now();
        let mut next_beat = Instant::now() + hb;
        loop {
            let dead_at = last_rx + dead_after;
            let wake = next_beat.min(dead_at);
            // `race` polls in random order, so a flood of frames cannot starve the timer or
            // the replies.
            let event = async { Event::Frame(ws.next().await) }
                .race(async { Event::Reply(reply_rx.recv().await.ok()) })
                .race(async { Event::Reply(lane_rx.recv().await.ok()) })
                .race(async {
                    self.ports.changed().await;
                    Event::Ports
                })
                .race(async {
                    match &self.outbox {
                        Some(outbox) => Event::Durable(outbox.next_frame().await),
                        None => std::future::pending().await,
                    }
                })
                .race(async {
                    smol::Timer::at(wake).await;
                    Event::Timer
                })
                .race(async {
                    shutdown.wait().await;
                    Event::Shutdown
                })
                .await;
            match event {
                Event::Frame(None) => {
                    return closed("the control plane closed the connection".to_owned());
                }
                Event::Frame(Some(Err(e))) => return closed(format!("connection error: {e}")),
                Event::Frame(Some(Ok(frame))) => {
                    last_rx = Instant::now();
                    let decoded = match frame {
                        WsMessage::Binary(bytes) => codec::decode(&bytes, Codec::Cbor),
                        WsMessage::Text(text) => codec::decode(text.as_bytes(), Codec::Json),
                        WsMessage::Close(close) => {
                            return closed(match close {
                                Some(c) => format!(
                                    "the control plane closed the link (code {}, {:?})",
                                    u16::from(c.code),
                                    c.reason.as_str()
                                ),
                                None => "the control plane closed the link".to_owned(),
                            });
                        }
                        // Pings are answered by tungstenite (flushed on the next poll).
                        WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
                    };
                    let msg = match decoded {
                        Ok(msg) => msg,
                        Err(e) => {
                            tracing::warn!("undecodable frame from the control plane: {e}");
                            let reply = Message::error(
                                ErrorCode::Proto,
                                None,
                                Some(&format!("undecodable frame: {e}")),
                            );
                            if let Err(e) = send(&mut ws, &shape_reply(reply, codec), codec).await {
                                return closed(e);
                            }
                            continue;
                        }
                    };
                    match msg {
                        Message::Error(e) => {
                            tracing::warn!(
                                "control-plane error: {}{}",
                                e.code.as_str(),
                                detail(e.message.as_deref())
                            );
                            if matches!(e.code, ErrorCode::Auth | ErrorCode::UpdateRequired) {
                                // E.g. the device key was revoked: retrying soon cannot help.
                                close(&mut ws, CLOSE_POLICY_VIOLATION, "auth failed").await;
                                return LinkEnd::Rejected {
                                    code: e.code.as_str().to_owned(),
                                    reason: format!(
                                        "the control plane withdrew this device's authorisation (e {}{}): check that the device and its key are still registered (`codemantle device add` output) and that device.key_file holds the current key",
                                        e.code.as_str(),
                                        detail(e.message.as_deref())
                                    ),
                                };
                            }
                        }
                        Message::HelloAck(_) => tracing::debug!("ignored a second h2"),
                        request => {
                            let permit = permits.acquire_arc().await;
                            let dispatcher = Arc::clone(&self.dispatcher);
                            let peer = peer.clone();
                            let reply_tx = reply_tx.clone();
                            smol::spawn(async move {
                                if let Some(reply) = dispatcher.handle(request, &peer).await {
                                    let _ = reply_tx.send(reply).await;
                                }
                                drop(permit);
                            })
                            .detach();
                        }
                    }
                }
                Event::Reply(None) => {}
                Event::Reply(Some(reply)) => {
                    let reply = shape_reply(reply, codec);
                    if let Err(e) = send_within(&mut ws, &reply, codec, dead_after).await {
                        return closed(e);
                    }
                }
                Event::Durable(frame) => {
                    if let Err(e) = send_within(&mut ws, &frame, codec, dead_after).await {
                        // Still in the outbox: the next link sends it again.
                        return closed(e);
                    }
                }
                Event::Ports => {
                    let ports = self.ports.get();
                    if ports != announced {
                        if let Err(e) = send_ports(&mut ws, &ports, codec).await {
                            return closed(e);
                        }
                        announced = ports;
                    }
                }
                Event::Timer => {
                    let now = Instant::now();
                    if now >= dead_at {
                        tracing::warn!(
                            "heartbeat timeout, terminating socket: nothing received for {} s (3×hb)",
                            dead_after.as_secs()
                        );
                        return closed(format!(
                            "link dead: nothing received for {} s (3×hb)",
                            dead_after.as_secs()
                        ));
                    }
                    if now >= next_beat {
                        next_beat = now + hb;
                        let p = Message::Telemetry(super::telemetry(self.started));
                        if let Err(e) = send_within(&mut ws, &p, codec, dead_after).await {
                            return closed(e);
                        }
                        // A ping makes the control plane answer even if it only pings on its
                        // own schedule; its pong keeps our liveness clock honest.
                        let ping = ws.send(WsMessage::Ping(Default::default()));
                        if let Err(e) = within(dead_after, ping).await {
                            return closed(e);
                        }
                    }
                }
                Event::Shutdown => {
                    close(&mut ws, 1000, "shutdown").await;
                    return LinkEnd::Shutdown;
                }
            }
        }
    }
}

enum Event {
    Frame(Option<Result<WsMessage, tungstenite::Error>>),
    Reply(Option<Message>),
    /// A frame from the durable outbox (session output).
    Durable(Message),
    Ports,
    Timer,
    Shutdown,
}

/// Encode and send one message in the link's codec (binary CBOR or JSON text).
async fn send(ws: &mut Ws, msg: &Message, codec: Codec) -> Result<(), String> {
    let bytes =
        codec::encode(msg, codec).map_err(|e| format!("cannot encode {}: {e}", msg.type_tag()))?;
    let frame = match codec {
        Codec::Cbor => WsMessage::binary(bytes),
        Codec::Json => WsMessage::text(
            String::from_utf8(bytes)
                .map_err(|_| "JSON encoder produced invalid UTF-8".to_owned())?,
        ),
    };
    ws.send(frame)
        .await
        .map_err(|e| format!("sending {} failed: {e}", msg.type_tag()))
}

/// [`send`], giving up after `limit` (a peer that stopped reading).
async fn send_within(
    ws: &mut Ws,
    msg: &Message,
    codec: Codec,
    limit: Duration,
) -> Result<(), String> {
    match send(ws, msg, codec)
        .or(async {
            smol::Timer::after(limit).await;
            Err(format!(
                "sending {} timed out: the control plane stopped reading",
                msg.type_tag()
            ))
        })
        .await
    {
        Err(e) if e.starts_with("cannot encode") => {
            // A reply that breaks a wire limit is a bug here, not a dead link.
            tracing::error!("{e}");
            Ok(())
        }
        other => other,
    }
}

async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, tungstenite::Error>>,
) -> Result<(), String> {
    async { fut.await.map(drop).map_err(|e| format!("send failed: {e}")) }
        .or(async {
            smol::Timer::after(limit).await;
            Err("send timed out: the control plane stopped reading".to_owned())
        })
        .await
}

async fn send_ports(ws: &mut Ws, ports: &[u16], codec: Codec) -> Result<(), String> {
    let pl = Message::PortList(PortList {
        ports: ports.to_vec(),
    });
    send(ws, &pl, codec).await
}

/// Close with `code`, waiting at most [`CLOSE_GRACE`] for the peer.
async fn close(ws: &mut Ws, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let _ = async {
        let _ = ws.close(Some(frame)).await;
        // Drain until the peer's close arrives (or the socket ends).
        while let Some(Ok(_)) = ws.next().await {}
    }
    .or(async {
        smol::Timer::after(CLOSE_GRACE).await;
    })
    .await;
}

/// `" (<m>)"` or nothing, for log lines.
fn detail(message: Option<&str>) -> String {
    message
        .map(|m| format!(" ({})", crate::redact::redact_text(m)))
        .unwrap_or_default()
}

/// 20 base64url characters from 15 random bytes (about 120 bits, as 0.1.50).
fn fresh_nonce() -> Result<String, String> {
    let mut bytes = [0u8; 15];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| format!("no randomness for the handshake nonce: {e}"))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Unix time in milliseconds.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_shape() {
        let n = fresh_nonce().unwrap();
        assert_eq!(n.len(), 20);
        assert!(codemantle_protocol::handshake::valid_nonce(&n));
        assert_ne!(n, fresh_nonce().unwrap());
    }
}
