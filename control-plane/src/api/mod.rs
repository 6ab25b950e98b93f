//! The HTTP API: hyper 1 (HTTP/1.1) driven by smol, optionally behind rustls.
//!
//! One listener serves operators (JSON API, SSE) and daemons (`/ws`, handed to the
//! [`tunnel::TunnelHook`]). Request pipeline, in order:
//! 1. route by method and percent-decoded path ([`routes::route`]); unknown → 404, wrong method → 405;
//! 2. `/ws` → tunnel hook (it authenticates with its own handshake);
//! 3. public routes: `/health`, `/openapi.json` (and `/metrics` if configured public);
//! 4. authenticate ([`crate::auth::AuthChain`]) → 401; handlers check roles → 403;
//! 5. handler; mutating routes run under [`idempotency::run`]; bodies ≤ [`ApiOptions::max_body_bytes`].
//!
//! With a preview host configured ([`ApiOptions::preview_host`]), a request whose `Host` is
//! under it never reaches the API routes: it is authenticated and proxied to a device port
//! ([`port`]), or refused.
//!
//! Every error is `{"error": CODE, "message": ...}` ([`error::ApiError`]); every response gets
//! an `x-request-id`, no-sniff/no-store headers, a metrics count and one log line.

pub mod commands;
pub mod config_push;
pub mod devices;
pub mod error;
pub mod events;
pub mod files;
pub mod git;
pub mod http;
pub mod idempotency;
pub mod openapi;
pub mod port;
pub mod routes;
pub mod sessions;
pub mod setup;
pub mod system;
pub mod templates;
pub mod tls;
pub mod tokens;
pub mod tunnel;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite, FutureExt as _};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use smol::net::{TcpListener, TcpStream};
use smol_hyper::rt::{FuturesIo, SmolTimer};

use crate::auth::{AuthChain, Principal};
use crate::metrics::{Gauges, Metrics};
use crate::presence::{MemoryPresence, Presence};
use crate::store::Store;
use crate::tunnel::{DeviceHub, DispatchConfig, Tunnel, TunnelConfig};
pub use error::ApiError;
pub use http::Body;
use routes::Route;
pub use tunnel::{TunnelHook, TunnelUnavailable, UpgradedIo};

/// Tunables of the API.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Serve `/metrics` without a token (for a scraper on a trusted network).
    pub public_metrics: bool,
    /// Interval of SSE keep-alive comments.
    pub sse_keepalive: Duration,
    /// The preview origin's host name: proxied ports are served only as
    /// `<port>-<device>.<preview_host>`, never on the API's origin ([`port`]).
    pub preview_host: Option<String>,
    /// Time allowed for a client to send request headers (and the TLS handshake).
    pub header_timeout: Duration,
    /// Time allowed for a client to send a whole request body once its headers are in;
    /// slower bodies get 408 and the connection is closed ([`http::read_body`]).
    pub body_timeout: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            max_body_bytes: http::MAX_BODY_BYTES,
            public_metrics: false,
            sse_keepalive: Duration::from_secs(15),
            preview_host: None,
            header_timeout: Duration::from_secs(30),
            body_timeout: http::DEFAULT_BODY_TIMEOUT,
        }
    }
}

/// Everything a request handler may use. Shared as `Arc<App>`.
pub struct App {
    pub store: Arc<dyn Store>,
    pub auth: AuthChain,
    pub presence: Arc<dyn Presence>,
    pub metrics: Arc<Metrics>,
    pub tunnel: Arc<dyn TunnelHook>,
    /// Live device connections; device routes dispatch through it.
    pub hub: Arc<DeviceHub>,
    pub options: ApiOptions,
}

impl App {
    /// An app with token auth, in-memory presence, fresh metrics and no tunnel yet (`/ws`
    /// answers 501 and every device is offline until [`App::with_tunnel`]).
    pub fn new(store: Arc<dyn Store>) -> App {
        let metrics = Arc::new(Metrics::new());
        App {
            auth: AuthChain::standard(store.clone()),
            hub: Arc::new(DeviceHub::new(
                store.clone(),
                metrics.clone(),
                DispatchConfig::default(),
            )),
            store,
            presence: Arc::new(MemoryPresence::new()),
            metrics,
            tunnel: Arc::new(TunnelUnavailable),
            options: ApiOptions::default(),
        }
    }

    /// Plugs the daemon tunnel in: `/ws` accepts daemons, device routes reach them.
    pub fn with_tunnel(mut self, config: TunnelConfig) -> App {
        self.hub = Arc::new(DeviceHub::new(
            self.store.clone(),
            self.metrics.clone(),
            config.dispatch.clone(),
        ));
        let tunnel = Tunnel::new(
            self.store.clone(),
            self.presence.clone(),
            self.metrics.clone(),
            self.hub.clone(),
            config,
        );
        self.tunnel = Arc::new(tunnel);
        self
    }

    /// Current gauges for `/metrics`.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            devices_connected: self.presence.online_count(),
        }
    }

    /// Answers one request (never fails: errors become JSON error responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let request_id = crate::secrets::hex(&crate::secrets::random_bytes::<8>());
        let app = self.clone();
        let outcome = AssertUnwindSafe(app.dispatch(req, peer))
            .catch_unwind()
            .await;
        let mut resp = match outcome {
            Ok(Ok(resp)) => resp,
            Ok(Err(err)) => err.into_response(),
            Err(_) => {
                tracing::error!(%method, %path, %request_id, "request handler panicked");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    format!("the server hit a bug; report it with request id {request_id}"),
                )
                .into_response()
            }
        };
        let status = resp.status();
        let headers = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            headers.insert("x-request-id", v);
        }
        if status != StatusCode::SWITCHING_PROTOCOLS {
            headers.insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            headers
                .entry(hyper::header::CACHE_CONTROL)
                .or_insert(HeaderValue::from_static("no-store"));
        }
        self.metrics.record_http(status.as_u16());
        tracing::info!(
            %method, %path, status = status.as_u16(), %request_id, %peer,
            ms = started.elapsed().as_millis() as u64,
            "request"
        );
        resp
    }

    async fn dispatch(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, ApiError> {
        if let Some(preview) = self.options.preview_host.clone() {
            let (parts, body) = req.into_parts();
            match port::classify_host(&preview, port::request_host(&parts)) {
                port::PreviewHost::Api => req = Request::from_parts(parts, body),
                port::PreviewHost::Target { port, device } => {
                    let principal: Principal = self.auth.authenticate(&parts)?;
                    return port::preview_origin(&self, &principal, &parts, body, &device, &port)
                        .await;
                }
                port::PreviewHost::Malformed => return Err(port::preview_host_only(&preview)),
            }
        }
        let segments = http::path_segments(req.uri().path())?;
        let route = routes::route(req.method(), &segments);
        match route {
            Route::NotFound => return Err(routes::not_found()),
            Route::MethodNotAllowed { allow } => return Err(routes::method_not_allowed(allow)),
            Route::Tunnel => return Ok(self.tunnel.handle(req, peer).await),
            Route::Health => return Ok(system::health(&self).await),
            Route::OpenApi => return Ok(system::openapi()),
            Route::Metrics if self.options.public_metrics => return Ok(system::metrics(&self)),
            _ => {}
        }
        let (parts, body) = req.into_parts();
        let principal: Principal = self.auth.authenticate(&parts)?;
        match route {
            Route::Metrics => system::metrics_authorized(&self, &principal),
            Route::DevicesList => devices::list(&self, &principal).await,
            Route::DevicesCreate => devices::create(&self, &principal, &parts, body).await,
            Route::DeviceGet(id) => devices::get(&self, &principal, &id).await,
            Route::DeviceRemove(id) => devices::remove(&self, &principal, &parts, &id).await,
            Route::TokensList => tokens::list(&self, &principal).await,
            Route::TokensCreate => tokens::create(&self, &principal, &parts, body).await,
            Route::TokenRevoke(id) => tokens::revoke(&self, &principal, &parts, &id).await,
            Route::EventsList => events::list(&self, &principal, &parts).await,
            Route::EventsStream => events::stream(&self, &principal, &parts).await,
            Route::DeviceCommand(id, op) => {
                commands::handle(&self, &principal, &parts, body, &id, op).await
            }
            Route::ConfigStatus(id, rid) => {
                config_push::status(&self, &principal, &parts, body, &id, &rid).await
            }
            Route::SessionSnapshot(sid) => {
                sessions::snapshot(&self, &principal, &parts, body, &sid).await
            }
            Route::SessionStream(sid) => sessions::stream(&self, &principal, &parts, &sid).await,
            Route::SessionJitRenew(sid) => {
                sessions::jit_renew(&self, &principal, &parts, body, &sid).await
            }
            Route::PortProxy(id, port) => {
                port::api_origin(&self, &principal, &parts, body, &id, &port).await
            }
            Route::TemplatesList => templates::list(&self, &principal).await,
            Route::TemplatesPublish => templates::publish(&self, &principal, &parts, body).await,
            Route::TemplateSchema => templates::schema(&principal),
            Route::TemplateCompile(tid) => templates::compile(&self, &principal, body, &tid).await,
            Route::FleetConfigPush => {
                config_push::fleet_push(&self, &principal, &parts, body).await
            }
            Route::McpList => templates::mcp_list(&self, &principal).await,
            Route::McpSave => templates::mcp_save(&self, &principal, &parts, body).await,
            Route::Tunnel
            | Route::Health
            | Route::OpenApi
            | Route::NotFound
            | Route::MethodNotAllowed { .. } => Err(routes::not_found()),
        }
    }
}

/// A bound listener, ready to [`Server::run`].
pub struct Server {
    listener: TcpListener,
    tls: Option<futures_rustls::TlsAcceptor>,
    app: Arc<App>,
}

impl Server {
    /// Binds `addr`; with `tls`, every connection must complete a TLS handshake first.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        app: Arc<App>,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        raise_backlog(&listener);
        Ok(Server {
            listener,
            tls: tls.map(futures_rustls::TlsAcceptor::from),
            app,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Accepts connections forever, one task per connection. Drop the future to stop
    /// accepting (connections in flight finish on their own).
    pub async fn run(self) -> io::Result<()> {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; retrying in 100 ms");
                    smol::Timer::after(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (app, tls) = (self.app.clone(), self.tls.clone());
            smol::spawn(serve_connection(stream, peer, tls, app)).detach();
        }
    }
}

/// Pending connections the kernel queues for `accept` (it caps this at `net.core.somaxconn`).
/// The standard library listens with 128: when a fleet reconnects at once (a control plane
/// restart), every SYN beyond that is dropped and retried by the client a second later.
const LISTEN_BACKLOG: libc::c_int = 4096;

/// Re-issues `listen` with [`LISTEN_BACKLOG`] (Linux and the BSDs update the backlog of a
/// listening socket in place). Best effort: on failure the default backlog stays.
fn raise_backlog(listener: &TcpListener) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: listen(2) on a descriptor the listener owns and keeps open.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not raise the listen backlog");
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<futures_rustls::TlsAcceptor>,
    app: Arc<App>,
) {
    let timeout = app.options.header_timeout;
    match tls {
        None if app.tunnel.serves_upgrades() => match sniff_upgrade(&stream, timeout).await {
            Sniffed::Upgrade { head_len, key } => {
                let mut stream = stream;
                if consume(&mut stream, head_len).await.is_err() {
                    return;
                }
                let request_id = crate::secrets::hex(&crate::secrets::random_bytes::<8>());
                app.metrics.record_http(101);
                tracing::debug!(%peer, %request_id, "tunnel upgrade");
                app.tunnel.serve_upgraded(stream, peer, &key, request_id);
            }
            Sniffed::Http => serve_http(stream, peer, app).await,
            Sniffed::Gone => {}
        },
        None => serve_http(stream, peer, app).await,
        // Boxed: the TLS state machine is ~4 KiB, and inline it would be part of every plain
        // connection's task too (a connect storm allocates one per daemon).
        Some(acceptor) => Box::pin(serve_tls(stream, peer, acceptor, app)).await,
    }
}

async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: futures_rustls::TlsAcceptor,
    app: Arc<App>,
) {
    let timeout = app.options.header_timeout;
    let handshake = async { acceptor.accept(stream).await.map(Some) }
        .or(async {
            smol::Timer::after(timeout).await;
            Ok(None)
        })
        .await;
    match handshake {
        Ok(Some(tls_stream)) => serve_http(tls_stream, peer, app).await,
        Ok(None) => tracing::debug!(%peer, "TLS handshake timed out"),
        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
    }
}

/// What a plain connection starts with.
enum Sniffed {
    /// A complete `/ws` WebSocket upgrade request of `head_len` bytes.
    Upgrade { head_len: usize, key: Vec<u8> },
    /// Anything else (including an upgrade split over several packets): hyper's.
    Http,
    /// Closed, or silent for the header timeout.
    Gone,
}

/// Largest upgrade request the fast path looks at (a daemon's is ~200 bytes; a larger one goes
/// to hyper). On the task's stack, not the heap: one allocation less per connection.
const SNIFF_BYTES: usize = 512;

/// Daemons' tunnel upgrades skip hyper: a connect storm of thousands of daemons spent a fifth
/// of the server's CPU in hyper's per-connection machinery for a request whose only answer is
/// `101`. So the first bytes of every plain connection are peeked at (not consumed): a
/// complete `GET /ws HTTP/1.1` that passes the checks `/ws` makes through hyper (method,
/// `Upgrade: websocket`, `Connection: upgrade`, `Sec-WebSocket-Version: 13`, a key) goes to
/// [`TunnelHook::serve_upgraded`]; everything else, bad upgrades included, is left to hyper
/// untouched, so its answers are the same as before.
async fn sniff_upgrade(stream: &TcpStream, timeout: Duration) -> Sniffed {
    let mut buf = [0u8; SNIFF_BYTES];
    let peeked = async { Some(stream.peek(&mut buf).await) }
        .or(async {
            smol::Timer::after(timeout).await;
            None
        })
        .await;
    match peeked {
        Some(Ok(n)) if n > 0 => match parse_upgrade(&buf[..n]) {
            Some((head_len, key)) => Sniffed::Upgrade {
                head_len,
                key: key.to_vec(),
            },
            None => Sniffed::Http,
        },
        _ => Sniffed::Gone,
    }
}

/// Reads (and drops) the `n` bytes [`sniff_upgrade`] peeked at.
async fn consume(stream: &mut TcpStream, mut n: usize) -> io::Result<()> {
    let mut buf = [0u8; 256];
    while n > 0 {
        let want = n.min(buf.len());
        let got = futures_lite::AsyncReadExt::read(stream, &mut buf[..want]).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        n -= got;
    }
    Ok(())
}

/// `(head length, Sec-WebSocket-Key)` if `bytes` start with a complete, well-formed
/// `GET /ws HTTP/1.1` WebSocket upgrade without a body; `None` for anything hyper should see.
fn parse_upgrade(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let mut lines = bytes[..end].split(|&b| b == b'\n');
    if lines.next()? != b"GET /ws HTTP/1.1\r" {
        return None;
    }
    let (mut upgrade, mut connection) = (false, false);
    let (mut version, mut key): (Option<&[u8]>, Option<&[u8]>) = (None, None);
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        // A token name, a value of visible characters and blanks: anything else is hyper's
        // to refuse.
        let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
        if name.is_empty() || !name.iter().all(tchar) {
            return None;
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return None;
        }
        let has = |token: &[u8]| {
            value
                .split(|&b| b == b',')
                .any(|part| part.trim_ascii().eq_ignore_ascii_case(token))
        };
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("upgrade") {
            upgrade |= has(b"websocket");
        } else if is("connection") {
            connection |= has(b"upgrade");
        } else if is("sec-websocket-version") {
            version = version.or(Some(value));
        } else if is("sec-websocket-key") {
            key = key.or(Some(value));
        } else if is("content-length") || is("transfer-encoding") {
            return None;
        }
    }
    if !(upgrade && connection && version == Some(b"13".as_slice())) {
        return None;
    }
    Some((end + 4, key?))
}

async fn serve_http<S>(stream: S, peer: SocketAddr, app: Arc<App>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = app.options.header_timeout;
    let body_timeout = app.options.body_timeout;
    let service = service_fn(move |req| {
        let app = app.clone();
        let respond = http::with_body_timeout(body_timeout, app.handle(req, peer));
        async move { Ok::<_, Infallible>(respond.await) }
    });
    let conn = http1::Builder::new()
        .timer(SmolTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(FuturesIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
