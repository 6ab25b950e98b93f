//! The seam where daemon tunnels plug into the HTTP listener.
//!
//! Daemons and operators share one listener: a request for `/ws` is handed, untouched and
//! unauthenticated (the tunnel has its own handshake), to the [`TunnelHook`]. The hook answers
//! the upgrade (`101 Switching Protocols` with `Sec-WebSocket-Accept`), then takes the upgraded
//! connection from [`hyper::upgrade::on`] and wraps it in [`UpgradedIo`] to get the
//! `futures-io` traits async-tungstenite needs:
//!
//! ```ignore
//! let upgraded = hyper::upgrade::on(&mut req);       // before returning the 101
//! smol::spawn(async move {
//!     let io = UpgradedIo::new(upgraded.await?);
//!     let ws = async_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
//!     ...
//! }).detach();
//! ```
//!
//! Until the tunnel lands, [`TunnelUnavailable`] answers 501 with a JSON error.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBuf, Write};
use hyper::{Request, Response, StatusCode};

use super::error::ApiError;
use super::http::Body;

/// A boxed, sendable future of a response.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// What the HTTP server calls for tunnel traffic.
pub trait TunnelHook: Send + Sync + 'static {
    /// Handles a request for `/ws` (any method) from `peer`.
    fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> ResponseFuture;

    /// Called after the API removed a device: close its tunnel if one is open.
    fn device_removed(&self, _device_id: &str) {}

    /// Whether the hook implements [`TunnelHook::serve_upgraded`]. If so, the listener answers
    /// plain-TCP `/ws` upgrades itself (see `api::sniff_upgrade`), without hyper.
    fn serves_upgrades(&self) -> bool {
        false
    }

    /// Takes over a plain TCP connection whose `GET /ws` WebSocket upgrade request the listener
    /// has read and checked (the checks of `/ws` through [`TunnelHook::handle`]; `key` is the
    /// `Sec-WebSocket-Key`): answers `101` (with `x-request-id: request_id`) and serves the
    /// tunnel on a task of its own. Called only if [`TunnelHook::serves_upgrades`].
    fn serve_upgraded(
        &self,
        stream: smol::net::TcpStream,
        peer: SocketAddr,
        key: &[u8],
        request_id: String,
    ) {
        let _ = (stream, peer, key, request_id);
    }
}

/// The placeholder hook: `/ws` answers 501 `tunnel_unavailable`.
pub struct TunnelUnavailable;

impl TunnelHook for TunnelUnavailable {
    fn handle(&self, _request: Request<Incoming>, _peer: SocketAddr) -> ResponseFuture {
        Box::pin(async {
            ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "tunnel_unavailable",
                "this control plane build does not accept daemon tunnels yet",
            )
            .into_response()
        })
    }
}

/// Adapts hyper's I/O traits (e.g. [`hyper::upgrade::Upgraded`]) to `futures-io`
/// `AsyncRead`/`AsyncWrite` (what async-tungstenite and futures-rustls use). The inverse
/// adapter is `smol_hyper::rt::FuturesIo`.
pub struct UpgradedIo<T> {
    inner: T,
}

impl<T> UpgradedIo<T> {
    pub fn new(inner: T) -> Self {
        UpgradedIo { inner }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Read + Unpin> AsyncRead for UpgradedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut read_buf = ReadBuf::new(buf);
        match Pin::new(&mut self.inner).poll_read(cx, read_buf.unfilled()) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(read_buf.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Write + Unpin> AsyncWrite for UpgradedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
