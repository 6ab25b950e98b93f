//! The daemon tunnel: WebSocket accept on `/ws`, the `h1`/`h2` handshake, one task per
//! connection, liveness, and command dispatch ([`DeviceHub`]).
//!
//! Daemons dial out to us, so everything a host does is answered on a connection it opened.
//! The pieces:
//! - [`Tunnel`] implements [`crate::api::TunnelHook`]: it answers the HTTP upgrade and spawns the
//!   connection task ([`connection`]).
//! - [`handshake`]: the first frame decides the peer kind (binary → native CBOR peer, text →
//!   CodeMantle 0.1.x JSON peer, which from then on only ever receives 0.1.x keys), then the
//!   `h1` is verified against the store's credentials (a device key authenticates only its own
//!   device id; 0.1.x shared tokens only when enabled, bound to registered devices of their
//!   tenant). Refusals are answered with an `e` frame (0.1.50's code and message) and the close
//!   code 0.1.50 uses.
//! - [`hub`]: which connection serves which device; request ids, pending replies, timeouts.
//!
//! # Memory per connection
//!
//! The goal is a few KiB per idle device at 10 000 devices. What a connection holds:
//! - tungstenite's read buffer: [`READ_BUFFER_BYTES`] (256 bytes) instead of the 128 KiB
//!   default; it is allocated eagerly and zero-filled on first read, so it is RSS. A larger
//!   frame grows it to the frame's size once its header is read (and is read in 256-byte
//!   steps). An idle session only ever reads pongs and telemetry, which fit. During the handshake it is
//!   [`HANDSHAKE_READ_BUFFER_BYTES`], so that an `h1` arrives in one read. The write buffer is
//!   0 (frames are written through, nothing staged).
//! - until the handshake succeeds, frames are capped at [`HANDSHAKE_MAX_FRAME_BYTES`], so an
//!   unauthenticated socket cannot make us reserve megabytes; after it, the codec's own limit.
//!   (async-tungstenite cannot change limits on a live stream, so the stream is rebuilt around
//!   the same socket between the two phases; nothing is buffered then: the daemon waits for
//!   `h2`.)
//! - one task whose future keeps the large handshake state boxed and freed after use;
//! - one [`hub::Conn`] (id, tenant, codec, an outbox and pending map that allocate on first
//!   use), one presence entry and one timer.
//!
//! With TLS terminated here, rustls adds its own record buffers (~ 2 × 16 KiB when busy);
//! terminate TLS in front of the control plane when the fleet is very large.
//!
//! # Liveness
//!
//! Each connection has its own timer (no global sweep: a sweep over 10 000 sockets would
//! stall dispatch, and one slow socket would delay everyone's pings). Every `ping_interval`
//! (default: `hb` from `h2`) the task sends a WebSocket ping; if nothing at all (pong, frame)
//! arrived for `dead_after` (default 2 × hb) the device is declared dead: its pending requests
//! fail, it goes offline, and the socket is dropped.

pub mod connection;
pub mod handshake;
pub mod hub;
pub mod recorder;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use codemantle_protocol::codec::Codec;
use codemantle_protocol::handshake::{
    DEFAULT_REPLAY_CAPACITY, DEFAULT_SKEW_MS, Verifier, VerifierConfig,
};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::api::http::full;
use crate::api::tunnel::ResponseFuture;
use crate::api::{ApiError, TunnelHook, UpgradedIo};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::store::Store;
pub use hub::{
    Caller, CheckedDevice, CloseCause, DeviceHub, DispatchConfig, DispatchError, Telemetry,
};

/// tungstenite's eagerly allocated read buffer of an authenticated connection. What an idle
/// session reads (pongs, `p` telemetry) fits. tungstenite grows the buffer to a larger frame's
/// size once its header is in, but still reads at most this much per `read` call. Those small
/// reads are served from memory while data flows: `connection::BurstRead` switches to 32 KiB
/// socket reads into a buffer it allocates on demand and frees when the socket goes quiet, so a
/// quarter KiB per connected device (10 000 devices: 2.5 MiB of RSS) costs large frames
/// (stream chunks, proxied bodies) no extra syscalls.
pub const READ_BUFFER_BYTES: usize = 256;
/// The read buffer before the handshake succeeded: an `h1` (a few hundred bytes) in one read.
/// Freed when the session's stream replaces the handshake's.
pub const HANDSHAKE_READ_BUFFER_BYTES: usize = 512;
/// Largest frame accepted before the handshake succeeded (an `h1` is well under 1 KiB).
pub const HANDSHAKE_MAX_FRAME_BYTES: usize = 8 * 1024;
/// Largest frame advertised in `h2` as `mx` (stream chunk size), as 0.1.50.
pub const MAX_CHUNK_BYTES: u32 = 8192;

/// Tunables of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// `hb` advertised in `h2`, seconds, 5..=120 (a 0.1.x daemon ignores an `h2` outside).
    pub heartbeat_secs: u32,
    /// How often we ping each connection (default: `hb`).
    pub ping_interval: Duration,
    /// Silence after which a connection is dead (default: 2 × `hb`).
    pub dead_after: Duration,
    /// Time from the upgrade to a verified `h1`.
    pub handshake_timeout: Duration,
    /// Sockets allowed to be between upgrade and verified `h1`; more are closed with 1013.
    pub max_unauthenticated: usize,
    /// Accepted clock difference of `h1.ts`, milliseconds.
    pub skew_ms: u64,
    /// Lowest accepted protocol version (`v`).
    pub protocol_floor: u64,
    /// Accept 0.1.x shared tokens (registered with `legacy-token add`) for registered devices.
    pub allow_legacy_tokens: bool,
    /// Accept `h1` frames that carry the raw token (`at`); 0.1.50 daemons never send it.
    pub allow_raw_token: bool,
    /// Nonces remembered for replay detection.
    pub replay_capacity: usize,
    /// Time allowed for writing one frame before the peer counts as stalled.
    pub write_timeout: Duration,
    /// Dispatch timeouts and bounds.
    pub dispatch: DispatchConfig,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig::with_heartbeat(25)
    }
}

impl TunnelConfig {
    /// Defaults around heartbeat `hb` seconds (clamped to 5..=120).
    pub fn with_heartbeat(hb: u32) -> Self {
        let hb = hb.clamp(5, 120);
        TunnelConfig {
            heartbeat_secs: hb,
            ping_interval: Duration::from_secs(u64::from(hb)),
            dead_after: Duration::from_secs(2 * u64::from(hb)),
            handshake_timeout: Duration::from_secs(10),
            max_unauthenticated: 1024,
            skew_ms: DEFAULT_SKEW_MS,
            protocol_floor: 1,
            allow_legacy_tokens: false,
            allow_raw_token: false,
            replay_capacity: DEFAULT_REPLAY_CAPACITY,
            write_timeout: Duration::from_secs(10),
            dispatch: DispatchConfig::default(),
        }
    }
}

/// WebSocket settings before the handshake: tiny buffers, tiny frames.
pub fn handshake_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(HANDSHAKE_READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(HANDSHAKE_MAX_FRAME_BYTES))
        .max_frame_size(Some(HANDSHAKE_MAX_FRAME_BYTES))
}

/// WebSocket settings of an authenticated connection: the codec's frame limit, small buffers.
pub fn session_ws_config(codec: Codec) -> WebSocketConfig {
    let max = codec.max_frame_bytes();
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        // Frames are written through; this only bounds what piles up while a write fails.
        .max_write_buffer_size(max + 64 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// State shared by every connection task.
pub struct TunnelShared {
    pub store: Arc<dyn Store>,
    pub presence: Arc<dyn Presence>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<DeviceHub>,
    pub config: TunnelConfig,
    /// Check-then-insert on the replay cache must be atomic; verification is CPU-only (the
    /// credentials are fetched before the lock is taken), so a plain mutex is right.
    pub verifier: Mutex<Verifier>,
    unauthenticated: AtomicUsize,
}

impl TunnelShared {
    /// Takes an unauthenticated slot, or `None` if all are taken.
    fn try_unauthenticated_slot(self: &Arc<Self>) -> Option<UnauthenticatedSlot> {
        let max = self.config.max_unauthenticated;
        self.unauthenticated
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| UnauthenticatedSlot(self.clone()))
    }

    /// Sockets currently between upgrade and verified `h1`.
    pub fn unauthenticated_count(&self) -> usize {
        self.unauthenticated.load(Ordering::Acquire)
    }
}

/// Holds one of the [`TunnelConfig::max_unauthenticated`] slots until dropped.
pub struct UnauthenticatedSlot(Arc<TunnelShared>);

impl Drop for UnauthenticatedSlot {
    fn drop(&mut self) {
        self.0.unauthenticated.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The `/ws` endpoint.
#[derive(Clone)]
pub struct Tunnel {
    shared: Arc<TunnelShared>,
}

impl Tunnel {
    /// A tunnel feeding `hub`.
    pub fn new(
        store: Arc<dyn Store>,
        presence: Arc<dyn Presence>,
        metrics: Arc<Metrics>,
        hub: Arc<DeviceHub>,
        config: TunnelConfig,
    ) -> Tunnel {
        let verifier = Verifier::new(VerifierConfig {
            skew_ms: config.skew_ms,
            protocol_floor: config.protocol_floor,
            allow_raw_token: config.allow_raw_token,
            replay_capacity: config.replay_capacity,
        });
        Tunnel {
            shared: Arc::new(TunnelShared {
                store,
                presence,
                metrics,
                hub,
                config,
                verifier: Mutex::new(verifier),
                unauthenticated: AtomicUsize::new(0),
            }),
        }
    }

    pub fn shared(&self) -> &Arc<TunnelShared> {
        &self.shared
    }

    pub fn hub(&self) -> &Arc<DeviceHub> {
        &self.shared.hub
    }
}

impl TunnelHook for Tunnel {
    fn handle(&self, mut request: Request<Incoming>, peer: SocketAddr) -> ResponseFuture {
        let shared = self.shared.clone();
        Box::pin(async move {
            let accept = match websocket_accept(&request) {
                Ok(accept) => accept,
                Err(e) => return e.into_response(),
            };
            let on_upgrade = hyper::upgrade::on(&mut request);
            drop(request);
            // Counted from the upgrade on, so a flood of half-open upgrades counts too.
            let slot = shared.try_unauthenticated_slot();
            if slot.is_none() {
                tracing::warn!(%peer, "too many pending tunnel handshakes; refusing with 1013");
            }
            smol::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => {
                        let io = UpgradedIo::new(upgraded);
                        connection::serve(shared, io, peer, slot, None).await
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "tunnel upgrade failed"),
                }
            })
            .detach();
            let mut resp = Response::new(full(Vec::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            if let Ok(v) = HeaderValue::from_str(&accept) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
            resp
        })
    }

    fn device_removed(&self, device_id: &str) {
        self.shared.hub.close_device(device_id, CloseCause::Removed);
    }

    fn serves_upgrades(&self) -> bool {
        true
    }

    /// The listener's fast path for plain-TCP daemons: the same `101` as [`Tunnel::handle`]
    /// (plus the `x-request-id` every response gets), written straight to the socket, and the
    /// connection task runs on the socket itself. No hyper connection, no `Upgraded` box, one
    /// task per connection instead of two.
    fn serve_upgraded(
        &self,
        stream: smol::net::TcpStream,
        peer: SocketAddr,
        key: &[u8],
        request_id: String,
    ) {
        let shared = self.shared.clone();
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-accept: {}\r\nx-request-id: {request_id}\r\n\r\n",
            derive_accept_key(key)
        );
        let slot = shared.try_unauthenticated_slot();
        if slot.is_none() {
            tracing::warn!(%peer, "too many pending tunnel handshakes; refusing with 1013");
        }
        smol::spawn(connection::serve(shared, stream, peer, slot, Some(head))).detach();
    }
}

/// Checks that `request` is a WebSocket upgrade (RFC 6455 §4.2.1) and returns the
/// `Sec-WebSocket-Accept` value.
fn websocket_accept(request: &Request<Incoming>) -> Result<String, ApiError> {
    let not_ws = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "/ws is the daemon tunnel: connect with a WebSocket (GET with Upgrade: websocket, \
             Sec-WebSocket-Version: 13)",
        )
    };
    let has_token = |name: header::HeaderName, token: &str| {
        request.headers().get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if request.method() != hyper::Method::GET
        || !has_token(header::UPGRADE, "websocket")
        || !has_token(header::CONNECTION, "upgrade")
    {
        return Err(not_ws());
    }
    if request
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(not_ws());
    }
    let key = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(not_ws)?;
    Ok(derive_accept_key(key.as_bytes()))
}
