//! A tiny HTTP/1.1 client for one thing: talking to an OpenCode server on `127.0.0.1`.
//!
//! Why not a general HTTP crate: the daemon only ever speaks to a process it started itself, on
//! loopback, with a handful of routes (`/global/health`, `/session`, `…/prompt_async`,
//! `/event`). A full client (connection pools, TLS, redirects, proxies, cookies) would add
//! megabytes and attack surface for none of that. This one opens a fresh connection per request
//! (`Connection: close`), sends HTTP Basic auth (OpenCode's `OPENCODE_SERVER_PASSWORD`, user
//! `opencode`), reads `Content-Length`, chunked or until-close bodies with hard size limits, and
//! parses Server-Sent Events for `/event`.
//!
//! It never follows redirects, never connects anywhere but `127.0.0.1`, and every request has a
//! deadline, so a wedged OpenCode cannot hang a control-plane request.
//!
//! The parsers ([`ResponseHead::parse`], [`ChunkDecoder`], [`SseParser`]) are sans-io and
//! tested on their own; the async part only moves bytes.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures_lite::FutureExt as _;
use futures_lite::io::{AsyncReadExt as _, AsyncWriteExt as _};
use smol::net::TcpStream;

/// The user name OpenCode expects with `OPENCODE_SERVER_PASSWORD` (its default).
pub const OPENCODE_USER: &str = "opencode";

/// Longest response head (status line + headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest JSON body accepted (a session list of a busy project fits many times).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Largest single SSE event accepted; a bigger one is skipped and reported.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

/// Why a request to OpenCode failed. Every message names the port so the operator can find the
/// process (`ss -ltnp sport = :PORT`).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing listens (OpenCode not up yet, or gone).
    #[error("cannot connect to OpenCode on 127.0.0.1:{port}: {source}")]
    Connect { port: u16, source: std::io::Error },
    /// No complete answer within the deadline.
    #[error("OpenCode on 127.0.0.1:{port} did not answer within {} ms", .after.as_millis())]
    Timeout { port: u16, after: Duration },
    /// The connection broke mid-answer.
    #[error("talking to OpenCode on 127.0.0.1:{port} failed: {source}")]
    Io { port: u16, source: std::io::Error },
    /// Not HTTP/1.x as we know it.
    #[error("OpenCode on 127.0.0.1:{port} sent a malformed HTTP answer: {what}")]
    Malformed { port: u16, what: &'static str },
    /// Larger than we are willing to hold.
    #[error("OpenCode on 127.0.0.1:{port} sent more than {limit} bytes")]
    TooLarge { port: u16, limit: usize },
}

impl HttpError {
    /// Whether OpenCode is not (or no longer) reachable at all, as opposed to answering badly.
    pub fn is_down(&self) -> bool {
        matches!(self, HttpError::Connect { .. })
    }
}

/// A complete answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A client for one OpenCode server (`127.0.0.1:port`, one password).
#[derive(Clone)]
pub struct OpenCodeClient {
    port: u16,
    /// `Basic base64(opencode:password)`; never logged.
    authorization: String,
    timeout: Duration,
}

impl std::fmt::Debug for OpenCodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeClient")
            .field("port", &self.port)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl OpenCodeClient {
    /// A client for `127.0.0.1:port` authenticating as `opencode:password`; each request gives
    /// up after `timeout`.
    pub fn new(port: u16, password: &str, timeout: Duration) -> OpenCodeClient {
        OpenCodeClient {
            port,
            authorization: basic_auth(OPENCODE_USER, password),
            timeout,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Response, HttpError> {
        self.request("GET", path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Response, HttpError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.request("POST", path, Some(&bytes)).await
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let port = self.port;
        let timeout = self.timeout;
        let work = async {
            let mut stream = self.connect().await?;
            let head = request_head(
                method,
                path,
                port,
                &self.authorization,
                body.map(<[u8]>::len),
                "application/json",
            );
            let io = |source| HttpError::Io { port, source };
            stream.write_all(head.as_bytes()).await.map_err(io)?;
            if let Some(body) = body {
                stream.write_all(body).await.map_err(io)?;
            }
            stream.flush().await.map_err(io)?;
            let mut reader = BodyReader::start(stream, port).await?;
            let status = reader.head.status;
            let mut body = Vec::new();
            if reader.head.has_body(method) {
                reader.read_to_end(&mut body, MAX_BODY_BYTES).await?;
            }
            Ok(Response { status, body })
        };
        work.or(async {
            smol::Timer::after(timeout).await;
            Err(HttpError::Timeout {
                port,
                after: timeout,
            })
        })
        .await
    }

    /// Open `GET /event` and return the event stream once OpenCode answered `200` (the
    /// deadline covers only that much; events may then be minutes apart).
    pub async fn events(&self) -> Result<EventStream, HttpError> {
        let port = self.port;
        let timeout = self.timeout;
        let open = async {
            let mut stream = self.connect().await?;
            let head = request_head(
                "GET",
                "/event",
                port,
                &self.authorization,
                None,
                "text/event-stream",
            );
            stream
                .write_all(head.as_bytes())
                .await
                .map_err(|source| HttpError::Io { port, source })?;
            let reader = BodyReader::start(stream, port).await?;
            Ok(reader)
        };
        let reader = open
            .or(async {
                smol::Timer::after(timeout).await;
                Err(HttpError::Timeout {
                    port,
                    after: timeout,
                })
            })
            .await?;
        Ok(EventStream {
            status: reader.head.status,
            reader,
            parser: SseParser::new(MAX_EVENT_BYTES),
            ready: std::collections::VecDeque::new(),
        })
    }

    async fn connect(&self) -> Result<TcpStream, HttpError> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|source| HttpError::Connect {
                port: self.port,
                source,
            })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// `Basic base64(user:password)`.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn request_head(
    method: &str,
    path: &str,
    port: u16,
    authorization: &str,
    content_length: Option<usize>,
    accept: &str,
) -> String {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {authorization}\r\nAccept: {accept}\r\nUser-Agent: codemantle-daemon\r\nConnection: close\r\n"
    );
    if let Some(len) = content_length {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {len}\r\n"
        ));
    }
    head.push_str("\r\n");
    head
}

// ---------------------------------------------------------------------------------------------
// Response head

/// How the body of a response is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length: n`.
    Length(u64),
    /// Neither: the body ends when the connection closes.
    UntilClose,
}

/// Status line and the headers we act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    pub content_type: Option<String>,
}

impl ResponseHead {
    /// Parse the head (without the final empty line).
    pub fn parse(head: &str) -> Result<ResponseHead, &'static str> {
        let mut lines = head.split("\r\n").flat_map(|l| l.split('\n'));
        let status_line = lines.next().ok_or("empty response")?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err("not an HTTP/1.x status line");
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|s| (100..1000).contains(s))
            .ok_or("bad status code")?;
        let mut framing = Framing::UntilClose;
        let mut content_type = None;
        for line in lines {
            if line.is_empty() {
                continue;
            }
            let (name, value) = line.split_once(':').ok_or("header line without ':'")?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") {
                if value.to_ascii_lowercase().contains("chunked") {
                    framing = Framing::Chunked;
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                if framing != Framing::Chunked {
                    framing = Framing::Length(value.parse().map_err(|_| "bad Content-Length")?);
                }
            } else if name.eq_ignore_ascii_case("content-type") {
                content_type = Some(value.to_owned());
            }
        }
        Ok(ResponseHead {
            status,
            framing,
            content_type,
        })
    }

    /// Whether a body follows (not for 1xx, 204, 304, or `HEAD`).
    pub fn has_body(&self, method: &str) -> bool {
        !(method == "HEAD" || self.status < 200 || self.status == 204 || self.status == 304)
    }
}

// ---------------------------------------------------------------------------------------------
// Chunked transfer decoding (sans-io)

/// Decodes `Transfer-Encoding: chunked`: feed raw bytes, get body bytes.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the `size[;ext]` line.
    #[default]
    Size,
    /// This many data bytes left in the current chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the zero chunk, until an empty one.
    Trailer,
    Done,
}

impl ChunkDecoder {
    pub fn new() -> ChunkDecoder {
        ChunkDecoder::default()
    }

    /// The final zero-size chunk and its trailers were seen.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decode `input`, appending body bytes to `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Done => return Ok(()),
                ChunkState::Data(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(input);
                        if self.line.len() > 4096 {
                            return Err("chunk size line too long");
                        }
                        return Ok(());
                    };
                    self.line.extend_from_slice(&input[..nl]);
                    input = &input[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        ChunkState::Size => {
                            let text = std::str::from_utf8(line).map_err(|_| "bad chunk size")?;
                            let hex = text.split(';').next().unwrap_or("").trim();
                            let size =
                                u64::from_str_radix(hex, 16).map_err(|_| "bad chunk size")?;
                            if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(size)
                            }
                        }
                        ChunkState::DataEnd => {
                            if !line.is_empty() {
                                return Err("chunk data not followed by CRLF");
                            }
                            ChunkState::Size
                        }
                        _ => {
                            if line.is_empty() {
                                ChunkState::Done
                            } else {
                                ChunkState::Trailer
                            }
                        }
                    };
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Body reading (async)

/// A response being read: the head, then the body in its framing.
struct BodyReader {
    stream: TcpStream,
    port: u16,
    head: ResponseHead,
    /// Raw bytes read past the head (or past what was consumed so far).
    pending: Vec<u8>,
    chunks: Option<ChunkDecoder>,
    /// Bytes of a `Content-Length` body still to come.
    remaining: Option<u64>,
    eof: bool,
}

impl BodyReader {
    /// Read and parse the head.
    async fn start(mut stream: TcpStream, port: u16) -> Result<BodyReader, HttpError> {
        let mut buf = Vec::with_capacity(1024);
        let mut tmp = [0u8; 4096];
        let head_end = loop {
            if let Some(pos) = find_head_end(&buf) {
                break pos;
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Err(HttpError::TooLarge {
                    port,
                    limit: MAX_HEAD_BYTES,
                });
            }
            let n = stream
                .read(&mut tmp)
                .await
                .map_err(|source| HttpError::Io { port, source })?;
            if n == 0 {
                return Err(HttpError::Malformed {
                    port,
                    what: "connection closed before the response head ended",
                });
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let (head_bytes, rest) = buf.split_at(head_end.0);
        let head_text = std::str::from_utf8(head_bytes).map_err(|_| HttpError::Malformed {
            port,
            what: "response head is not UTF-8",
        })?;
        let head =
            ResponseHead::parse(head_text).map_err(|what| HttpError::Malformed { port, what })?;
        let pending = rest[head_end.1 - head_end.0..].to_vec();
        let (chunks, remaining) = match head.framing {
            Framing::Chunked => (Some(ChunkDecoder::new()), None),
            Framing::Length(n) => (None, Some(n)),
            Framing::UntilClose => (None, None),
        };
        Ok(BodyReader {
            stream,
            port,
            head,
            pending,
            chunks,
            remaining,
            eof: false,
        })
    }

    /// Append the next piece of body to `out`; `false` at the end of the body.
    async fn read_some(&mut self, out: &mut Vec<u8>) -> Result<bool, HttpError> {
        let port = self.port;
        loop {
            if self.remaining == Some(0) || self.chunks.as_ref().is_some_and(ChunkDecoder::is_done)
            {
                return Ok(false);
            }
            if !self.pending.is_empty() {
                let raw = std::mem::take(&mut self.pending);
                let before = out.len();
                match (&mut self.chunks, &mut self.remaining) {
                    (Some(dec), _) => dec
                        .push(&raw, out)
                        .map_err(|what| HttpError::Malformed { port, what })?,
                    (None, Some(left)) => {
                        let n = usize::try_from(*left).unwrap_or(usize::MAX).min(raw.len());
                        out.extend_from_slice(&raw[..n]);
                        *left -= n as u64;
                    }
                    (None, None) => out.extend_from_slice(&raw),
                }
                if out.len() > before {
                    return Ok(true);
                }
                continue;
            }
            if self.eof {
                return match (&self.chunks, self.remaining) {
                    (None, None) => Ok(false),
                    _ => Err(HttpError::Malformed {
                        port,
                        what: "connection closed before the body ended",
                    }),
                };
            }
            let mut tmp = vec![0u8; 16 * 1024];
            let n = self
                .stream
                .read(&mut tmp)
                .await
                .map_err(|source| HttpError::Io { port, source })?;
            if n == 0 {
                self.eof = true;
            } else {
                tmp.truncate(n);
                self.pending = tmp;
            }
        }
    }

    async fn read_to_end(&mut self, out: &mut Vec<u8>, limit: usize) -> Result<(), HttpError> {
        while self.read_some(out).await? {
            if out.len() > limit {
                return Err(HttpError::TooLarge {
                    port: self.port,
                    limit,
                });
            }
        }
        Ok(())
    }
}

/// (end of head, start of body): the first `\r\n\r\n` (or bare `\n\n`).
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        return Some((p, p + 4));
    }
    buf.windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| (p, p + 2))
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events

/// One parsed SSE record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    /// The `data:` lines of one event, joined with `\n`.
    Event(String),
    /// An event larger than the limit was skipped; this many bytes of it were seen.
    Oversized(usize),
}

/// Parses an SSE byte stream (`text/event-stream`): `data:` lines accumulate, an empty line
/// ends the event; comments (`:`), `event:`, `id:` and `retry:` lines are ignored (OpenCode
/// sends only `data:`). Sans-io: feed bytes with [`SseParser::push`].
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    /// Bytes of the current event when it went over the limit.
    oversized: Option<usize>,
    max_event: usize,
}

impl SseParser {
    pub fn new(max_event: usize) -> SseParser {
        SseParser {
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            oversized: None,
            max_event,
        }
    }

    /// Feed bytes; complete events are appended to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<SseItem>) {
        let mut rest = input;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            if self.oversized.is_none() {
                self.line.extend_from_slice(&rest[..nl]);
            } else {
                self.bump_oversized(nl);
            }
            rest = &rest[nl + 1..];
            let line = std::mem::take(&mut self.line);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            self.line_done(line, out);
        }
        if self.oversized.is_some() {
            self.bump_oversized(rest.len());
        } else {
            self.line.extend_from_slice(rest);
            if self.line.len() + self.data.len() > self.max_event {
                self.go_oversized();
            }
        }
    }

    fn bump_oversized(&mut self, n: usize) {
        if let Some(seen) = &mut self.oversized {
            *seen = seen.saturating_add(n);
        }
    }

    fn go_oversized(&mut self) {
        let seen = self.data.len() + self.line.len();
        self.data.clear();
        self.line.clear();
        self.oversized = Some(seen);
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseItem>) {
        if line.is_empty() {
            if let Some(seen) = self.oversized.take() {
                out.push(SseItem::Oversized(seen));
            } else if self.has_data {
                out.push(SseItem::Event(std::mem::take(&mut self.data)));
            }
            self.data.clear();
            self.has_data = false;
            return;
        }
        if self.oversized.is_some() || line.first() == Some(&b':') {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field != b"data" {
            return;
        }
        if self.has_data {
            self.data.push('\n');
        }
        match std::str::from_utf8(value) {
            Ok(text) => self.data.push_str(text),
            Err(_) => self.data.push_str(&String::from_utf8_lossy(value)),
        }
        self.has_data = true;
        if self.data.len() > self.max_event {
            self.go_oversized();
        }
    }
}

/// An open `GET /event` stream.
pub struct EventStream {
    /// OpenCode's status for the request (200 when it worked).
    pub status: u16,
    reader: BodyReader,
    parser: SseParser,
    ready: std::collections::VecDeque<SseItem>,
}

impl EventStream {
    /// Whether OpenCode accepted the subscription (`200` and an event-stream body).
    pub fn is_open(&self) -> bool {
        self.status == 200
            && self
                .reader
                .head
                .content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("text/event-stream"))
    }

    /// The next event, or `None` when OpenCode ended the stream.
    pub async fn next(&mut self) -> Result<Option<SseItem>, HttpError> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Ok(Some(item));
            }
            let mut bytes = Vec::new();
            if !self.reader.read_some(&mut bytes).await? {
                return Ok(None);
            }
            let mut items = Vec::new();
            self.parser.push(&bytes, &mut items);
            self.ready.extend(items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = ResponseHead::parse(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked",
        )
        .unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Chunked);
        assert_eq!(h.content_type.as_deref(), Some("text/event-stream"));
        let h = ResponseHead::parse("HTTP/1.1 204 No Content\r\ncontent-length: 0").unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        assert!(!h.has_body("POST"));
        let h = ResponseHead::parse("HTTP/1.0 401 Unauthorized").unwrap();
        assert_eq!((h.status, h.framing), (401, Framing::UntilClose));
        assert!(ResponseHead::parse("SSH-2.0-x").is_err());
        assert!(ResponseHead::parse("HTTP/1.1 abc").is_err());
        assert!(ResponseHead::parse("HTTP/1.1 200 OK\r\nContent-Length: x").is_err());
    }

    #[test]
    fn chunked_in_every_split() {
        let raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 0..raw.len() {
            let mut dec = ChunkDecoder::new();
            let mut out = Vec::new();
            dec.push(&raw[..split], &mut out).unwrap();
            dec.push(&raw[split..], &mut out).unwrap();
            assert_eq!(out, b"hello world", "split {split}");
            assert!(dec.is_done());
        }
        let mut dec = ChunkDecoder::new();
        assert!(dec.push(b"zz\r\n", &mut Vec::new()).is_err());
        let mut dec = ChunkDecoder::new();
        assert!(dec.push(b"1\r\nab\r\n", &mut Vec::new()).is_err());
    }

    #[test]
    fn sse_records() {
        let raw = b"data: {\"a\":1}\n\n: heartbeat comment\n\nevent: x\ndata: two\r\ndata: lines\r\n\r\nid: 7\ndata:{}\n\n";
        for split in 0..raw.len() {
            let mut p = SseParser::new(1024);
            let mut out = Vec::new();
            p.push(&raw[..split], &mut out);
            p.push(&raw[split..], &mut out);
            assert_eq!(
                out,
                [
                    SseItem::Event("{\"a\":1}".into()),
                    SseItem::Event("two\nlines".into()),
                    SseItem::Event("{}".into()),
                ],
                "split {split}"
            );
        }
    }

    #[test]
    fn sse_oversized_event_is_skipped_not_fatal() {
        let mut p = SseParser::new(10);
        let mut out = Vec::new();
        p.push(b"data: 0123456789abcdef\n\ndata: ok\n\n", &mut out);
        assert!(
            matches!(out[0], SseItem::Oversized(n) if n >= 16),
            "{out:?}"
        );
        assert_eq!(out[1], SseItem::Event("ok".into()));
        // Split inside the big line.
        let mut p = SseParser::new(10);
        let mut out = Vec::new();
        p.push(b"data: 0123456789", &mut out);
        p.push(b"abcdef\n\ndata: ok\n\n", &mut out);
        assert!(matches!(out[0], SseItem::Oversized(_)), "{out:?}");
        assert_eq!(out[1], SseItem::Event("ok".into()));
    }

    #[test]
    fn auth_header() {
        assert_eq!(
            basic_auth("opencode", "s3cret"),
            "Basic b3BlbmNvZGU6czNjcmV0"
        );
    }

    /// A one-shot loopback server answering `answer` to the first request.
    fn serve_once(answer: &'static [u8]) -> (u16, std::thread::JoinHandle<String>) {
        use std::io::{Read as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // Read the head and a body of `{}` if one is announced.
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).unwrap();
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req);
                let complete = match text.split_once("\r\n\r\n") {
                    Some((head, body)) => !head.contains("Content-Length") || body == "{}",
                    None => false,
                };
                if n == 0 || complete {
                    break;
                }
            }
            s.write_all(answer).unwrap();
            String::from_utf8_lossy(&req).into_owned()
        });
        (port, t)
    }

    #[test]
    fn request_round_trip_over_loopback() {
        let (port, t) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{\"ok\":1\r\n1\r\n}\r\n0\r\n\r\n",
        );
        let c = OpenCodeClient::new(port, "pw", Duration::from_secs(5));
        let r = smol::block_on(c.post_json("/session", &serde_json::json!({}))).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json().unwrap()["ok"], 1);
        let req = t.join().unwrap();
        assert!(req.starts_with("POST /session HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("Authorization: {}", basic_auth("opencode", "pw"))));
        assert!(req.ends_with("\r\n\r\n{}"), "{req}");
    }

    #[test]
    fn refused_and_silent_servers() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = OpenCodeClient::new(port, "pw", Duration::from_secs(5));
        let e = smol::block_on(c.get("/global/health")).unwrap_err();
        assert!(e.is_down(), "{e}");
        // Accepts, never answers.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = OpenCodeClient::new(
            l.local_addr().unwrap().port(),
            "pw",
            Duration::from_millis(200),
        );
        let e = smol::block_on(c.get("/global/health")).unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(
            e.to_string().contains("did not answer within 200 ms"),
            "{e}"
        );
    }
}
