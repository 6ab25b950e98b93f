//! `proxy`: the port proxy (`pr` → `pv`, then `ps`* and `pe` for a streamed body).
//!
//! The control plane forwards an operator's HTTP request to a port on this host's loopback and
//! gets the answer back over the tunnel. That is a hole in the host boundary by design, so it
//! is kept narrow:
//!
//! - **Which ports**: only the port of one of this device's *running* sessions (the session
//!   manager knows them; the session's OpenCode password is added as HTTP Basic auth, so the
//!   operator reaches the server without ever seeing the password) or a port the config
//!   exposes explicitly (`exposed_ports`). Anything else is refused with `e AUTH`
//!   `port_not_exposed: …` before a socket is opened. The target is always `127.0.0.1:<port>`.
//!   0.1.50 also proxied every port that *appeared* while a session ran (a port scan), which
//!   let any local process become reachable from the control plane; we do not.
//! - **What requests**: methods on [`ALLOWED_METHODS`] (`e LIMIT method_not_allowed`
//!   otherwise: no `CONNECT`, no `TRACE`); the target must be an origin-form path (`/…`,
//!   printable ASCII without spaces), header names `[A-Za-z0-9-]` and values without control
//!   characters (so nothing can inject a second request line or header: `e PROTO`), at most
//!   [`MAX_REQUEST_HEADER_BYTES`] of headers (`e LIMIT headers_too_large`). The codec has
//!   already enforced the wire limits (64 headers, 4096-byte values, a 1.5 MB body).
//!   Hop-by-hop headers ([`HOP_BY_HOP`], `sec-websocket-*`) are dropped; so is
//!   `accept-encoding` (bodies travel uncompressed: a 0.1.x control plane drops
//!   `content-encoding` and would hand out compressed bytes as plain). Each request uses a
//!   fresh connection with `Connection: close`.
//! - **The answer**: the head must arrive within [`ProxySettings::head_timeout`] (else `pv o:0
//!   m:"upstream_timeout: …"`); a refused connection, a malformed or oversize head are `pv o:0`
//!   too, with a message that names the port. A body of known length up to
//!   [`BUFFER_LIMIT`] comes back in the `pv` itself. Any other body — chunked, until-close,
//!   Server-Sent Events, or large — is **streamed**: `pv` with `ss:1` (and the upstream's
//!   `content-length`, when it gave one, so a cut-short body is detectable), then the decoded
//!   body as `ps` chunks of at most [`CHUNK_BYTES`] as they arrive, then `pe`.
//!
//! # Backpressure and stream lifetime
//!
//! Streamed frames go through the link's *stream lane* ([`Outbound::send_stream`]), a bounded
//! queue the link pulls from only as fast as it writes to the socket. When it is full the pump
//! stops reading from the upstream, so TCP pushes back on the upstream server and an endless
//! stream never piles up in memory: at most the lane's frames plus one chunk per stream are
//! held. A stream ends when the upstream ends it, when the link drops (the lane closes), when
//! the control plane sends `pe` with the request id (its HTTP client went away — native
//! control planes only; a 0.1.x one never cancels), or after [`ProxySettings::max_stream`]. At
//! most [`ProxySettings::max_streams`] run at once; more are refused with `e FLOW`.
//!
//! End to end, a native control plane also paces each stream by its HTTP client: a stream may
//! have [`STREAM_WINDOW_BYTES`] in flight, and the control plane grants more with `pw {i, n}`
//! as its client takes the body. So a slow download is slowed down at the source instead of
//! being buffered (or cut off) in the control plane. 0.1.x control planes send no `pw` and get
//! no window.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codemantle_protocol::codec::Codec;
use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::message::{
    Header, Message, ProxyChunk, ProxyRequest, ProxyResponse, RequestOnly,
};
use futures_lite::FutureExt as _;
use futures_lite::io::{AsyncReadExt as _, AsyncWriteExt as _};
use smol::net::TcpStream;

use crate::dispatch::{Outbound, Peer};
use crate::session::SessionManager;
use crate::session::http::{ChunkDecoder, Framing, OPENCODE_USER, ResponseHead, basic_auth};

/// Methods the proxy forwards.
pub const ALLOWED_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Request and response headers never forwarded (hop-by-hop, or set by the proxy itself).
/// `sec-websocket-*` is dropped too: WebSocket upgrades are not proxied.
pub const HOP_BY_HOP: [&str; 13] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
    "expect",
];

/// Most bytes of request headers (names + values) forwarded to the upstream.
pub const MAX_REQUEST_HEADER_BYTES: usize = 32 * 1024;
/// Longest response head (status line + headers) accepted from the upstream.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// Bodies of known length up to this size come back in the `pv` itself; larger ones stream.
pub const BUFFER_LIMIT: usize = 256 * 1024;
/// Largest `ps` chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Frames the link's stream lane holds before a pump has to wait (see the module doc).
pub const STREAM_LANE_FRAMES: usize = 16;
/// Body bytes a stream may have in flight to a native control plane before it waits for `pw`
/// credit. With one chunk of overshoot this must stay under the control plane's per-stream
/// buffer (`PROXY_STREAM_BUFFER_BYTES`, 4 MiB), or a slow client would be cut off.
pub const STREAM_WINDOW_BYTES: i64 = 2 * 1024 * 1024;

/// Longest `e.m` / `pv.m` (the wire limit is 256 characters).
const MAX_TEXT: usize = 256;

/// How the proxy behaves; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// Ports proxied besides those of running sessions (the config's `exposed_ports`).
    pub exposed_ports: Vec<u16>,
    /// Connect + send + response head.
    pub head_timeout: Duration,
    /// Longest a streamed response may run.
    pub max_stream: Duration,
    /// Streamed responses at once.
    pub max_streams: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            exposed_ports: Vec::new(),
            head_timeout: Duration::from_secs(20),
            max_stream: Duration::from_secs(3600),
            max_streams: 32,
        }
    }
}

/// Open streams by (link session id, request id): dropping `cancel` stops the pump; `credit`
/// carries the control plane's `pw` grants to it.
struct StreamCtl {
    #[allow(
        dead_code,
        reason = "held only to be dropped: that is the cancel signal"
    )]
    cancel: async_channel::Sender<()>,
    credit: async_channel::Sender<u32>,
}

type OpenStreams = HashMap<(String, u32), StreamCtl>;

/// The port proxy. Cheap to share (`Arc`).
pub struct Proxy {
    settings: ProxySettings,
    sessions: Option<Arc<SessionManager>>,
    /// Open streams by (link session id, request id): dropping the sender cancels the pump.
    streams: Arc<Mutex<OpenStreams>>,
    open: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("settings", &self.settings)
            .field("open_streams", &self.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Why a request was refused before anything was sent upstream: an `e` frame.
struct Refusal {
    code: ErrorCode,
    text: String,
}

impl Refusal {
    fn new(code: ErrorCode, text: String) -> Refusal {
        Refusal { code, text }
    }
}

/// Why the upstream gave no usable answer: `pv o:0`.
#[derive(Debug)]
struct UpstreamError(String);

/// What the upstream answered, up to the start of the body.
struct Head {
    status: u16,
    reason: String,
    headers: Vec<Header>,
    framing: Framing,
    has_body: bool,
    content_length: Option<u64>,
}

impl Proxy {
    /// A proxy to the ports of `sessions`' running sessions and `settings.exposed_ports`.
    pub fn new(settings: ProxySettings, sessions: Option<Arc<SessionManager>>) -> Proxy {
        Proxy {
            settings,
            sessions,
            streams: Arc::default(),
            open: Arc::default(),
        }
    }

    /// Streamed responses running now.
    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// `pw` from the control plane: its client took `bytes` more of stream `id` of link `sid`.
    pub fn credit(&self, sid: &str, id: u32, bytes: u32) {
        if let Some(ctl) = lock(&self.streams).get(&(sid.to_owned(), id)) {
            let _ = ctl.credit.try_send(bytes);
        }
    }

    /// `pe` from the control plane: stop streaming the answer to request `id` of link `sid`.
    pub fn cancel(&self, sid: &str, id: u32) {
        let removed = lock(&self.streams).remove(&(sid.to_owned(), id));
        if removed.is_some() {
            tracing::debug!(request = id, "proxy stream cancelled by the control plane");
        }
    }

    /// Handles one `pr`. Returns the reply for a refusal or a buffered answer; `None` when the
    /// answer is streamed (its `pv`, `ps` and `pe` go through the peer's stream lane).
    pub async fn handle(&self, req: ProxyRequest, peer: &Peer) -> Option<Message> {
        let id = req.request_id;
        let started = Instant::now();
        let auth = match self.check(&req) {
            Ok(auth) => auth,
            Err(refusal) => {
                tracing::info!(request = id, port = req.port, code = %refusal.code, "proxy request refused: {}", refusal.text);
                return Some(Message::error(
                    refusal.code,
                    Some(id),
                    Some(&cut(refusal.text)),
                ));
            }
        };
        let port = req.port;
        let deadline = self.settings.head_timeout;
        let opened = async { open(&req, auth.as_deref()).await }
            .or(async {
                smol::Timer::after(deadline).await;
                Err(UpstreamError(format!(
                    "upstream_timeout: 127.0.0.1:{port} did not answer within {} s",
                    deadline.as_secs()
                )))
            })
            .await;
        let (stream, head, rest) = match opened {
            Ok(opened) => opened,
            Err(UpstreamError(text)) => {
                tracing::info!(request = id, port, "proxy upstream failed: {text}");
                return Some(failed(id, text));
            }
        };
        tracing::debug!(
            request = id,
            port,
            status = head.status,
            ms = started.elapsed().as_millis() as u64,
            "proxy head"
        );
        let small = matches!(head.framing, Framing::Length(n) if n <= BUFFER_LIMIT as u64);
        if !head.has_body || small {
            let body = if head.has_body {
                let want = head.content_length.unwrap_or(0) as usize;
                let read = read_exact_body(stream, rest, want)
                    .or(async {
                        smol::Timer::after(deadline).await;
                        Err(UpstreamError(format!(
                            "upstream_timeout: 127.0.0.1:{port} did not send its {want}-byte body within {} s",
                            deadline.as_secs()
                        )))
                    })
                    .await;
                match read {
                    Ok(body) => body,
                    Err(UpstreamError(text)) => return Some(failed(id, text)),
                }
            } else {
                Vec::new()
            };
            return Some(Message::ProxyResponse(ProxyResponse {
                request_id: id,
                ok: true,
                status: Some(head.status),
                status_text: Some(head.reason),
                headers: Some(head.headers),
                body: Some(body),
                error: None,
                streaming: false,
            }));
        }

        // Streamed.
        let Some(out) = peer.outbound.clone() else {
            return Some(failed(id, "no link to stream the answer on".to_owned()));
        };
        if self.open.fetch_add(1, Ordering::SeqCst) >= self.settings.max_streams {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Some(Message::error(
                ErrorCode::Flow,
                Some(id),
                Some(&cut(format!(
                    "too_many_streams: {} proxied responses are already streaming on this host; retry when one ends",
                    self.settings.max_streams
                ))),
            ));
        }
        let key = (peer.sid.clone(), id);
        let (cancel_tx, cancel_rx) = async_channel::bounded::<()>(1);
        let (credit_tx, credit_rx) = async_channel::unbounded::<u32>();
        {
            let mut streams = lock(&self.streams);
            // Streams of an earlier link have nobody to go to: end them (a pump also stops
            // on its own when it next tries to send).
            streams.retain(|(sid, _), _| *sid == peer.sid);
            streams.insert(
                key.clone(),
                StreamCtl {
                    cancel: cancel_tx,
                    credit: credit_tx,
                },
            );
        }
        let pv = Message::ProxyResponse(ProxyResponse {
            request_id: id,
            ok: true,
            status: Some(head.status),
            status_text: Some(head.reason.clone()),
            headers: Some(head.headers.clone()),
            body: Some(Vec::new()),
            error: None,
            streaming: true,
        });
        let pump = Pump {
            id,
            port,
            out,
            stream,
            rest,
            framing: head.framing,
            cancel: cancel_rx,
            credit: credit_rx,
            // Only native control planes grant credit; a 0.1.x one is paced by the link alone.
            window: (peer.codec == Codec::Cbor).then_some(STREAM_WINDOW_BYTES),
            max: self.settings.max_stream,
        };
        let (streams, open) = (Arc::clone(&self.streams), Arc::clone(&self.open));
        smol::spawn(async move {
            if pump.out.send_stream(pv).await {
                pump.run().await;
            }
            lock(&streams).remove(&key);
            open.fetch_sub(1, Ordering::SeqCst);
        })
        .detach();
        None
    }

    /// Checks `req` against the rules in the module doc; the upstream `Authorization` to add
    /// (a session's OpenCode password) when the port is a session's.
    fn check(&self, req: &ProxyRequest) -> Result<Option<String>, Refusal> {
        if !ALLOWED_METHODS.contains(&req.method.as_str()) {
            return Err(Refusal::new(
                ErrorCode::Limit,
                format!(
                    "method_not_allowed: {} is not proxied; allowed: {}",
                    req.method,
                    ALLOWED_METHODS.join(", ")
                ),
            ));
        }
        let target_ok = req.target.starts_with('/')
            && !req.target.starts_with("//")
            && req.target.bytes().all(|b| b.is_ascii_graphic());
        if !target_ok {
            return Err(Refusal::new(
                ErrorCode::Proto,
                "invalid_target: the path must start with a single '/' and hold printable ASCII only (percent-encode the rest)".to_owned(),
            ));
        }
        let mut total = 0;
        for Header { name, value } in &req.headers {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(Refusal::new(
                    ErrorCode::Proto,
                    format!("invalid_header: header name {name:?} is not [A-Za-z0-9-]+"),
                ));
            }
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(Refusal::new(
                    ErrorCode::Proto,
                    format!("invalid_header: the value of {name} holds a control character"),
                ));
            }
            total += name.len() + value.len();
        }
        if total > MAX_REQUEST_HEADER_BYTES {
            return Err(Refusal::new(
                ErrorCode::Limit,
                format!(
                    "headers_too_large: {total} bytes of request headers; at most {MAX_REQUEST_HEADER_BYTES} are forwarded"
                ),
            ));
        }
        if let Some(sessions) = &self.sessions {
            if let Some(session) = sessions.sessions().into_iter().find(|s| s.port == req.port) {
                let password = sessions.record(&session.id).map(|r| r.password);
                return Ok(password.map(|p| basic_auth(OPENCODE_USER, &p)));
            }
        }
        if self.settings.exposed_ports.contains(&req.port) {
            return Ok(None);
        }
        Err(Refusal::new(
            ErrorCode::Auth,
            format!(
                "port_not_exposed: port {} is neither a running session's port nor in this host's exposed_ports",
                req.port
            ),
        ))
    }
}

/// A streamed answer being copied from the upstream to the stream lane.
struct Pump {
    id: u32,
    port: u16,
    out: Outbound,
    stream: TcpStream,
    /// Body bytes read with the head.
    rest: Vec<u8>,
    framing: Framing,
    cancel: async_channel::Receiver<()>,
    credit: async_channel::Receiver<u32>,
    /// Bytes that may still be sent before waiting for credit (`None`: no flow control).
    window: Option<i64>,
    max: Duration,
}

enum Step {
    Read(std::io::Result<usize>),
    Cancelled,
    Expired,
}

impl Pump {
    async fn run(mut self) {
        let (id, port) = (self.id, self.port);
        let ends_at = Instant::now() + self.max;
        let mut decoder = ChunkDecoder::new();
        let mut left = match self.framing {
            Framing::Length(n) => n,
            _ => u64::MAX,
        };
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut pending = std::mem::take(&mut self.rest);
        let mut sent: u64 = 0;
        let why = loop {
            // Checked first: with data always ready, a read would win every race.
            if self.cancel.is_closed() {
                tracing::debug!(request = id, port, sent, "proxy stream cancelled");
                return;
            }
            let raw = if pending.is_empty() {
                let step = async {
                    let _ = self.cancel.recv().await;
                    Step::Cancelled
                }
                .or(async { Step::Read(self.stream.read(&mut buf).await) })
                .or(async {
                    smol::Timer::at(ends_at).await;
                    Step::Expired
                })
                .await;
                match step {
                    Step::Read(Ok(0)) => {
                        break if matches!(self.framing, Framing::UntilClose) {
                            "upstream ended"
                        } else {
                            "upstream closed early"
                        };
                    }
                    Step::Read(Ok(n)) => buf[..n].to_vec(),
                    Step::Read(Err(_)) => break "upstream read failed",
                    Step::Cancelled => {
                        tracing::debug!(request = id, port, sent, "proxy stream cancelled");
                        return;
                    }
                    Step::Expired => break "stream time limit reached",
                }
            } else {
                std::mem::take(&mut pending)
            };
            let data = match self.framing {
                Framing::Chunked => {
                    let mut out = Vec::with_capacity(raw.len());
                    if decoder.push(&raw, &mut out).is_err() {
                        break "upstream sent malformed chunked encoding";
                    }
                    out
                }
                Framing::Length(_) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(raw.len());
                    left -= n as u64;
                    raw[..n].to_vec()
                }
                Framing::UntilClose => raw,
            };
            if !data.is_empty() {
                // Out of credit: wait for the control plane's client to catch up.
                while self.window.is_some_and(|w| w <= 0) {
                    let got = async { self.credit.recv().await.ok() }
                        .or(async {
                            let _ = self.cancel.recv().await;
                            None
                        })
                        .await;
                    match got {
                        Some(n) => self.window = self.window.map(|w| w + i64::from(n)),
                        None => {
                            tracing::debug!(request = id, port, sent, "proxy stream cancelled");
                            return;
                        }
                    }
                }
                if let Some(w) = &mut self.window {
                    *w -= data.len() as i64;
                }
                sent += data.len() as u64;
                let chunk = Message::ProxyChunk(ProxyChunk {
                    request_id: id,
                    data,
                });
                // A full lane may keep this waiting; a cancel must still get through.
                let sent_ok = async { Some(self.out.send_stream(chunk).await) }
                    .or(async {
                        let _ = self.cancel.recv().await;
                        None
                    })
                    .await;
                match sent_ok {
                    Some(true) => {}
                    Some(false) => {
                        tracing::debug!(request = id, port, "proxy stream: link gone");
                        return;
                    }
                    None => {
                        tracing::debug!(request = id, port, sent, "proxy stream cancelled");
                        return;
                    }
                }
            }
            if decoder.is_done() || left == 0 {
                break "upstream ended";
            }
        };
        tracing::debug!(request = id, port, sent, "proxy stream ended: {why}");
        self.out
            .send_stream(Message::ProxyEnd(RequestOnly { request_id: id }))
            .await;
    }
}

/// Connects, sends the request and reads the head: the connection, the head and whatever body
/// bytes came with it.
async fn open(
    req: &ProxyRequest,
    auth: Option<&str>,
) -> Result<(TcpStream, Head, Vec<u8>), UpstreamError> {
    let port = req.port;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| {
        UpstreamError(format!(
            "upstream_unreachable: cannot connect to 127.0.0.1:{port}: {e}"
        ))
    })?;
    let _ = stream.set_nodelay(true);
    let io = |e: std::io::Error| {
        UpstreamError(format!(
            "upstream_failed: talking to 127.0.0.1:{port} failed: {e}"
        ))
    };
    let head = request_head(req, auth);
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    if !req.body.is_empty() {
        stream.write_all(&req.body).await.map_err(io)?;
    }
    stream.flush().await.map_err(io)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(UpstreamError(format!(
                "upstream_failed: 127.0.0.1:{port} closed the connection before a complete response head"
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = find_head_end(&buf) {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            let rest = buf[end + 4..].to_vec();
            let head = parse_head(&text, &req.method).map_err(|what| {
                UpstreamError(format!(
                    "upstream_malformed: 127.0.0.1:{port} sent a malformed HTTP answer: {what}"
                ))
            })?;
            match head {
                // Informational (100 Continue, 103 Early Hints): the real head follows.
                None => buf = rest,
                Some(head) => return Ok((stream, head, rest)),
            }
        }
        if buf.len() > MAX_RESPONSE_HEAD_BYTES {
            return Err(UpstreamError(format!(
                "upstream_malformed: 127.0.0.1:{port} sent a response head over {MAX_RESPONSE_HEAD_BYTES} bytes"
            )));
        }
    }
}

/// The request line and headers sent upstream.
fn request_head(req: &ProxyRequest, auth: Option<&str>) -> String {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n",
        req.method, req.target, req.port
    );
    for Header { name, value } in &req.headers {
        let lower = name.to_ascii_lowercase();
        if is_hop_by_hop(&lower) || (auth.is_some() && lower == "authorization") {
            continue;
        }
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    if let Some(auth) = auth {
        head.push_str("Authorization: ");
        head.push_str(auth);
        head.push_str("\r\n");
    }
    if !req.body.is_empty() || matches!(req.method.as_str(), "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("Content-Length: {}\r\n", req.body.len()));
    }
    head.push_str("\r\n");
    head
}

fn is_hop_by_hop(lower: &str) -> bool {
    HOP_BY_HOP.contains(&lower) || lower.starts_with("sec-websocket-")
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Parses a response head; `None` for an informational (1xx) one.
fn parse_head(text: &str, method: &str) -> Result<Option<Head>, &'static str> {
    let parsed = ResponseHead::parse(text)?;
    if parsed.status < 200 {
        if parsed.status == 101 {
            return Err("101 Switching Protocols (upgrades are not proxied)");
        }
        return Ok(None);
    }
    if parsed.status > 599 {
        return Err("status code above 599");
    }
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let reason = status_line.splitn(3, ' ').nth(2).unwrap_or("").trim();
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(128)
        .collect();
    let reason = if reason.is_empty() {
        "ok".to_owned()
    } else {
        reason
    };
    let mut headers: Vec<Header> = Vec::new();
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        if name == "content-length" {
            content_length = value.parse::<u64>().ok();
        }
        let keep = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && value.len() <= 4096
            && (name == "content-length" || !is_hop_by_hop(&name));
        if !keep {
            tracing::debug!(header = %name, "proxy: dropped a response header");
            continue;
        }
        if headers.len() == codemantle_protocol::limits::MAX_HEADERS {
            tracing::warn!("proxy: upstream sent more than 64 headers; the rest are dropped");
            break;
        }
        headers.push(Header::new(name, value));
    }
    let has_body = parsed.has_body(method);
    if !matches!(parsed.framing, Framing::Length(_)) || !has_body {
        headers.retain(|h| h.name != "content-length");
    }
    Ok(Some(Head {
        status: parsed.status,
        reason,
        headers,
        framing: parsed.framing,
        has_body,
        content_length,
    }))
}

/// Reads exactly `want` body bytes (`rest` holds the first ones).
async fn read_exact_body(
    mut stream: TcpStream,
    mut rest: Vec<u8>,
    want: usize,
) -> Result<Vec<u8>, UpstreamError> {
    rest.truncate(want);
    if rest.len() < want {
        let start = rest.len();
        rest.resize(want, 0);
        stream.read_exact(&mut rest[start..]).await.map_err(|e| {
            UpstreamError(format!(
                "upstream_failed: the body from 127.0.0.1 ended early: {e}"
            ))
        })?;
    }
    Ok(rest)
}

fn failed(id: u32, text: String) -> Message {
    Message::ProxyResponse(ProxyResponse {
        request_id: id,
        ok: false,
        status: None,
        status_text: None,
        headers: None,
        body: None,
        error: Some(cut(text)),
        streaming: false,
    })
}

/// `text` cut to the wire's 256 characters.
fn cut(text: String) -> String {
    if text.chars().count() <= MAX_TEXT {
        return text;
    }
    text.chars().take(MAX_TEXT - 1).chain(['…']).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> ProxyRequest {
        ProxyRequest {
            request_id: 1,
            port: 3000,
            method: method.to_owned(),
            target: target.to_owned(),
            headers: headers.iter().map(|(n, v)| Header::new(*n, *v)).collect(),
            body: Vec::new(),
        }
    }

    fn proxy() -> Proxy {
        Proxy::new(
            ProxySettings {
                exposed_ports: vec![3000],
                ..ProxySettings::default()
            },
            None,
        )
    }

    fn refusal(r: &ProxyRequest) -> Option<(ErrorCode, String)> {
        proxy().check(r).err().map(|e| (e.code, e.text))
    }

    #[test]
    fn requests_that_could_smuggle_or_escape_are_refused() {
        assert!(refusal(&req("GET", "/a?b=c", &[("accept", "x")])).is_none());
        let (code, text) = refusal(&req("CONNECT", "/", &[])).unwrap();
        assert_eq!(code, ErrorCode::Limit);
        assert!(text.starts_with("method_not_allowed"), "{text}");
        for target in ["http://evil/", "//evil/x", "/a b", "/a\r\nX: y", "x"] {
            let (code, _) = refusal(&req("GET", target, &[])).unwrap();
            assert_eq!(code, ErrorCode::Proto, "{target:?}");
        }
        let (code, text) = refusal(&req("GET", "/", &[("x-a", "1\r\nHost: evil")])).unwrap();
        assert_eq!(code, ErrorCode::Proto);
        assert!(text.starts_with("invalid_header"), "{text}");
        let big = "v".repeat(4000);
        let many: Vec<(&str, &str)> = (0..9).map(|_| ("x-big", big.as_str())).collect();
        let (code, text) = refusal(&req("GET", "/", &many)).unwrap();
        assert_eq!(code, ErrorCode::Limit);
        assert!(text.starts_with("headers_too_large"), "{text}");
        let mut other = req("GET", "/", &[]);
        other.port = 3001;
        let (code, text) = refusal(&other).unwrap();
        assert_eq!(code, ErrorCode::Auth);
        assert!(text.starts_with("port_not_exposed"), "{text}");
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let r = req(
            "POST",
            "/x",
            &[
                ("Connection", "keep-alive, x-secret"),
                ("Transfer-Encoding", "chunked"),
                ("Accept-Encoding", "gzip"),
                ("Sec-WebSocket-Key", "k"),
                ("Host", "evil"),
                ("X-Keep", "1"),
            ],
        );
        let head = request_head(&r, Some("Basic abc"));
        assert!(head.starts_with("POST /x HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n"));
        assert!(head.contains("X-Keep: 1\r\n"));
        assert!(head.contains("Authorization: Basic abc\r\n"));
        assert!(head.contains("Content-Length: 0\r\n"));
        for gone in ["keep-alive", "chunked", "gzip", "Sec-WebSocket", "evil"] {
            assert!(!head.contains(gone), "{gone} forwarded: {head}");
        }
    }

    #[test]
    fn response_heads_are_filtered() {
        let text = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\
                    Transfer-Encoding: chunked\r\nBad_Name: 1\r\nSet-Cookie: a=b";
        let head = parse_head(text, "GET").unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.reason, "OK");
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(
            head.headers,
            vec![
                Header::new("content-type", "text/plain"),
                Header::new("set-cookie", "a=b")
            ]
        );
        assert!(
            parse_head("HTTP/1.1 103 Early Hints\r\nLink: x", "GET")
                .unwrap()
                .is_none()
        );
        assert!(parse_head("HTTP/1.1 101 Switching\r\nUpgrade: ws", "GET").is_err());
        let head = parse_head("HTTP/1.1 204 No Content\r\nContent-Length: 0", "GET")
            .unwrap()
            .unwrap();
        assert!(!head.has_body);
        assert!(head.headers.is_empty());
    }

    #[test]
    fn long_texts_are_cut_to_the_wire_limit() {
        let t = cut("x".repeat(1000));
        assert_eq!(t.chars().count(), MAX_TEXT);
    }
}
