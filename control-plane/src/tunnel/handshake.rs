//! The server side of the `h1`/`h2` handshake over a fresh WebSocket.
//!
//! The first data frame decides what the peer is: a binary frame is a native peer (CBOR from
//! then on), a text frame a CodeMantle 0.1.x daemon (JSON, and only 0.1.x keys ever sent to it).
//! That frame must be a valid `h1`; the checks run in 0.1.50's order (version floor, `v == 1`,
//! shape, clock skew, replay, credential, MAC — see [`codemantle_protocol::handshake::Verifier`])
//! and then our device binding. Every refusal is an `e` frame with 0.1.50's code and message,
//! then the close code 0.1.50 uses, so a 0.1.50 daemon backs off exactly as it would against
//! the original control plane.
//!
//! Credentials are read from the store *before* the verifier's lock is taken, so the lock only
//! ever covers CPU work. Which credential may claim which device:
//! - a device key (`device add`): only its own device id;
//! - a 0.1.x shared token (`legacy-token add`), only if the tunnel allows legacy tokens: only
//!   devices registered in the token's tenant (and, if the token is bound, only its listed
//!   ids). There is no auto-enrolment: a device must be registered before it can connect.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use codemantle_protocol::codec::Codec;
use codemantle_protocol::error::{DecodeError, ErrorCode};
use codemantle_protocol::handshake::{
    Credential, CredentialKind, H1Fields, HandshakeError, Secret, VerifiedPeer,
};
use codemantle_protocol::message::{Hello, Message};
use futures_lite::{AsyncRead, AsyncWrite, FutureExt as _, StreamExt as _};

use super::TunnelShared;
use super::hub::encode_frame;
use crate::store::{DeviceCredential, LegacyToken, StoreResult, TenantId};

/// Close code for "try again later" (RFC 6455 registry: 1013).
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;
/// Close code for a frame above the size limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a protocol error.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code for a policy violation (authentication failures).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code for an internal error.
pub const CLOSE_INTERNAL: u16 = 1011;

/// How long we wait for the peer's side of a close before dropping the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// A daemon that passed the handshake.
pub struct Accepted {
    pub device_id: String,
    pub tenant: TenantId,
    pub codec: Codec,
    pub peer: VerifiedPeer,
    pub hello: Hello,
}

/// What the first frame was.
enum First {
    Data(Codec, Vec<u8>),
    TooLarge,
    Gone,
    TimedOut,
}

/// Runs the handshake. On failure the peer has been answered and the socket closed; `None`.
pub async fn run<S>(
    shared: &TunnelShared,
    ws: &mut WebSocketStream<S>,
    remote: SocketAddr,
) -> Option<Accepted>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let (codec, bytes) = match first_frame(ws, deadline).await {
        First::Data(codec, bytes) => (codec, bytes),
        First::Gone => return None,
        First::TooLarge => {
            tracing::info!(%remote, "tunnel refused: oversize first frame");
            refuse(
                ws,
                Codec::Json,
                ErrorCode::Limit,
                None,
                CLOSE_TOO_BIG,
                "frame too large",
            )
            .await;
            return None;
        }
        First::TimedOut => {
            tracing::info!(%remote, "tunnel refused: no h1 within the handshake timeout");
            let m = Some("handshake_timeout".to_owned());
            refuse(
                ws,
                Codec::Json,
                ErrorCode::Proto,
                m,
                CLOSE_POLICY,
                "handshake timeout",
            )
            .await;
            return None;
        }
    };
    let hello = match Message::decode(&bytes, codec) {
        Ok(Message::Hello(h)) => h,
        Ok(Message::HelloUnsupported(u)) => {
            // Only the version is known; the verifier decides between "update required" (below
            // the floor) and "not supported" (above v1) before it looks at anything else.
            let fields = H1Fields {
                version: u.version,
                device_id: "",
                key_id: None,
                token: None,
                nonce: "",
                ts_ms: 0,
                mac: "",
            };
            let err = match verify(shared, &fields, &|_: &str| None) {
                Err(e) => e,
                Ok(_) => HandshakeError::ProtocolNotSupported {
                    received: u.version,
                },
            };
            tracing::info!(%remote, error = %err, "tunnel refused");
            refuse_handshake(ws, codec, &err).await;
            return None;
        }
        Ok(_) => {
            tracing::info!(%remote, "tunnel refused: first frame is not h1");
            let code = ErrorCode::Proto;
            refuse(
                ws,
                codec,
                code,
                None,
                CLOSE_PROTOCOL_ERROR,
                "expected handshake",
            )
            .await;
            return None;
        }
        Err(DecodeError::FrameTooLarge { .. }) => {
            refuse(
                ws,
                codec,
                ErrorCode::Limit,
                None,
                CLOSE_TOO_BIG,
                "frame too large",
            )
            .await;
            return None;
        }
        Err(e) => {
            tracing::info!(%remote, error = %e, "tunnel refused: malformed first frame");
            let reason = match (is_garbage(&e), codec) {
                (true, Codec::Json) => "invalid json",
                (true, Codec::Cbor) => "invalid frame",
                (false, _) => "expected handshake",
            };
            refuse(
                ws,
                codec,
                ErrorCode::Proto,
                None,
                CLOSE_PROTOCOL_ERROR,
                reason,
            )
            .await;
            return None;
        }
    };

    let credentials = match fetch_credentials(shared, &hello) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%remote, error = %e, "tunnel handshake: store lookup failed");
            let m = Some("control_plane_unavailable".to_owned());
            refuse(
                ws,
                codec,
                ErrorCode::Internal,
                m,
                CLOSE_INTERNAL,
                "try again later",
            )
            .await;
            return None;
        }
    };
    let (device, legacy) = credentials;
    let lookup = |key_id: &str| credential_for(key_id, device.as_ref(), legacy.as_ref());
    let fields = H1Fields {
        version: 1,
        device_id: &hello.device_id,
        key_id: hello.key_id.as_deref(),
        token: hello.auth_token.as_deref(),
        nonce: &hello.nonce,
        ts_ms: hello.timestamp_ms,
        mac: &hello.mac,
    };
    let peer = match verify(shared, &fields, &lookup) {
        Ok(peer) => peer,
        Err(err) => {
            tracing::info!(%remote, device = %hello.device_id, error = %err, "tunnel refused");
            refuse_handshake(ws, codec, &err).await;
            return None;
        }
    };
    let tenant = match (peer.credential, device, legacy) {
        (CredentialKind::Device, Some(d), _) => d.tenant,
        (CredentialKind::Shared, Some(d), Some(t)) if d.tenant == t.tenant => d.tenant,
        _ => {
            tracing::info!(
                %remote, device = %hello.device_id,
                "tunnel refused: shared token used for a device not registered in its tenant"
            );
            let m = Some("device_not_registered".to_owned());
            refuse(
                ws,
                codec,
                ErrorCode::Auth,
                m,
                CLOSE_POLICY,
                "device not registered",
            )
            .await;
            return None;
        }
    };
    Some(Accepted {
        device_id: hello.device_id.clone(),
        tenant,
        codec,
        peer,
        hello,
    })
}

fn verify(
    shared: &TunnelShared,
    fields: &H1Fields<'_>,
    lookup: &dyn Fn(&str) -> Option<Credential>,
) -> Result<VerifiedPeer, HandshakeError> {
    let now = crate::time::now_ms();
    shared
        .verifier
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .verify(fields, now, &lookup)
}

/// The device's credential and, if legacy tokens are enabled, the shared token named by the
/// `h1` (by `ak`, or by the key id of `at`).
///
/// Point reads, made right here on the executor like the API's token lookups: a blocking-pool
/// hop per handshake cost more (two thread wake-ups) than the read, and in a reconnect storm
/// it kept dozens of pool threads spinning up and down.
fn fetch_credentials(
    shared: &TunnelShared,
    hello: &Hello,
) -> StoreResult<(Option<DeviceCredential>, Option<LegacyToken>)> {
    let store = &shared.store;
    let legacy_key = if shared.config.allow_legacy_tokens {
        hello
            .key_id
            .clone()
            .or_else(|| hello.auth_token.as_deref().map(crate::secrets::key_id))
    } else {
        None
    };
    let device = store.device_credential(&hello.device_id)?;
    let legacy = match legacy_key {
        Some(k) => store.legacy_token(&k)?.filter(|t| !t.revoked),
        None => None,
    };
    Ok((device, legacy))
}

fn credential_for(
    key_id: &str,
    device: Option<&DeviceCredential>,
    legacy: Option<&LegacyToken>,
) -> Option<Credential> {
    if let Some(d) = device.filter(|d| d.key_id == key_id) {
        return Some(Credential::Device {
            device_id: d.device_id.clone(),
            secret: Secret::new(d.secret.as_bytes().to_vec()),
        });
    }
    legacy
        .filter(|t| t.key_id == key_id)
        .map(|t| Credential::Shared {
            secret: Secret::new(t.token.as_bytes().to_vec()),
            allowed_devices: t.devices.clone(),
        })
}

/// Malformed bytes (as opposed to a well-formed frame that is not a valid message).
pub fn is_garbage(e: &DecodeError) -> bool {
    matches!(
        e,
        DecodeError::Json(_)
            | DecodeError::Cbor(_)
            | DecodeError::Truncated
            | DecodeError::TrailingBytes
            | DecodeError::TooDeep { .. }
            | DecodeError::TooManyValues { .. }
    )
}

async fn first_frame<S>(ws: &mut WebSocketStream<S>, deadline: Instant) -> First
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let next = async { Some(ws.next().await) }
            .or(async {
                smol::Timer::at(deadline).await;
                None
            })
            .await;
        match next {
            None => return First::TimedOut,
            Some(None) => return First::Gone,
            Some(Some(Ok(WsMessage::Text(t)))) => {
                return First::Data(Codec::Json, t.as_bytes().to_vec());
            }
            Some(Some(Ok(WsMessage::Binary(b)))) => return First::Data(Codec::Cbor, b.to_vec()),
            Some(Some(Ok(WsMessage::Close(_)))) => return First::Gone,
            Some(Some(Ok(_))) => continue,
            Some(Some(Err(WsError::Capacity(_)))) => return First::TooLarge,
            Some(Some(Err(_))) => return First::Gone,
        }
    }
}

async fn refuse_handshake<S>(ws: &mut WebSocketStream<S>, codec: Codec, err: &HandshakeError)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    refuse(
        ws,
        codec,
        err.wire_code(),
        err.wire_message(),
        err.close_code(),
        err.close_reason(),
    )
    .await;
}

/// Sends `e {c, m?}`, closes with `close`/`reason`, and waits briefly for the peer's close.
pub async fn refuse<S>(
    ws: &mut WebSocketStream<S>,
    codec: Codec,
    code: ErrorCode,
    message: Option<String>,
    close: u16,
    reason: &'static str,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Ok(frame) = encode_frame(&Message::error(code, None, message.as_deref()), codec) {
        let _ = with_timeout(CLOSE_LINGER, ws.send(frame)).await;
    }
    close_now(ws, close, reason).await;
}

/// Sends a close frame and waits up to a second for the peer to answer it.
pub async fn close_now<S>(ws: &mut WebSocketStream<S>, code: u16, reason: &'static str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    if with_timeout(CLOSE_LINGER, ws.close(Some(frame)))
        .await
        .is_some_and(|r| r.is_ok())
    {
        linger(ws).await;
    }
}

/// Reads (and discards) until the peer has closed, for at most [`CLOSE_LINGER`]. Dropping a
/// socket with unread data makes the kernel send a reset, which can destroy our last frames
/// before the peer reads them.
pub async fn linger<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = with_timeout(CLOSE_LINGER, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// `Some(output)` if `fut` finished within `limit`.
pub async fn with_timeout<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    async { Some(fut.await) }
        .or(async {
            smol::Timer::after(limit).await;
            None
        })
        .await
}
