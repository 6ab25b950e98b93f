//! A minimal HTTP/1.1 client for the `codemantle` CLI (and the tests): one request per
//! connection (`Connection: close`), `Content-Length`/chunked/EOF bodies, streaming reads for
//! SSE, `http://` and `https://` (rustls + ring, roots from a CA file or the system bundle).
//!
//! Why not hyper's client: it needs extra crates we do not otherwise build (and would have
//! to vendor for air-gapped builds), for a CLI that makes one request at a time.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::io::BufReader;
use futures_lite::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt,
};
use serde_json::Value;
use smol::net::TcpStream;

/// Why a request failed before an HTTP status came back.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {url:?}: {why} (expected e.g. http://127.0.0.1:8787)")]
    BadUrl { url: String, why: &'static str },
    #[error("cannot connect to {addr}: {source} (is the control plane running and reachable?)")]
    Connect { addr: String, source: io::Error },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("connection to {addr} failed: {source}")]
    Io { addr: String, source: io::Error },
    #[error("the server's reply is not valid HTTP: {0}")]
    Protocol(String),
    #[error("no answer from {addr} within {secs} s")]
    Timeout { addr: String, secs: u64 },
}

/// A parsed server base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    pub tls: bool,
    /// Host without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (`""` or `/cp`).
    pub base_path: String,
}

impl ServerUrl {
    pub fn parse(url: &str) -> Result<ServerUrl, ClientError> {
        let bad = |why| ClientError::BadUrl {
            url: url.to_owned(),
            why,
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(bad("it must start with http:// or https://"));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| bad("the port is not a number 1..65535"))?,
            None if tls => 443,
            None => 80,
        };
        Ok(ServerUrl {
            tls,
            host: host.to_owned(),
            port,
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A request to send.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// Path and query, starting with `/` (the base path is prepended).
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Self {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            ..Default::default()
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn json(mut self, value: &Value) -> Self {
        self.body = Some(serde_json::to_vec(value).unwrap_or_default());
        self.header("content-type", "application/json")
    }
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    url: ServerUrl,
    token: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Limit for connecting plus a whole non-streaming exchange.
    pub timeout: Duration,
}

impl Client {
    /// A client for `url` sending `token` as a bearer token. For https, roots come from
    /// `ca_file` if given, else from `SSL_CERT_FILE` or the system bundle.
    pub fn new(
        url: &str,
        token: Option<String>,
        ca_file: Option<&Path>,
    ) -> Result<Client, ClientError> {
        let url = ServerUrl::parse(url)?;
        let tls = if url.tls {
            Some(tls_config(ca_file)?)
        } else {
            None
        };
        Ok(Client {
            url,
            token,
            tls,
            timeout: Duration::from_secs(60),
        })
    }

    pub fn url(&self) -> &ServerUrl {
        &self.url
    }

    /// Sends `req` and reads the whole response.
    pub async fn send(&self, req: Request) -> Result<Response, ClientError> {
        let addr = self.url.authority();
        let secs = self.timeout.as_secs();
        async {
            let mut stream = self.open(req).await?;
            let mut body = Vec::new();
            while let Some(chunk) = stream.read_chunk().await? {
                body.extend_from_slice(&chunk);
            }
            Ok(Response {
                status: stream.status,
                headers: stream.headers,
                body,
            })
        }
        .or(async {
            smol::Timer::after(self.timeout).await;
            Err(ClientError::Timeout { addr, secs })
        })
        .await
    }

    /// Sends `req` and returns once the response head arrived; read the body incrementally.
    pub async fn open(&self, req: Request) -> Result<StreamingResponse, ClientError> {
        let addr = self.url.authority();
        let io_err = |source| ClientError::Io {
            addr: addr.clone(),
            source,
        };
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .or(async {
                smol::Timer::after(Duration::from_secs(10)).await;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connect timed out after 10 s",
                ))
            })
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let mut io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.url.host.clone())
                    .map_err(|e| ClientError::Tls(format!("{}: {e}", self.url.host)))?;
                let tls = futures_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ClientError::Tls(format!("handshake with {addr}: {e}")))?;
                Box::new(tls)
            }
        };
        let head = self.request_head(&req);
        io.write_all(head.as_bytes()).await.map_err(io_err)?;
        if let Some(body) = &req.body {
            io.write_all(body).await.map_err(io_err)?;
        }
        io.flush().await.map_err(io_err)?;
        let mut reader = BufReader::new(io);
        let (status, headers) = read_head(&mut reader).await.map_err(|e| match e {
            HeadError::Io(source) => io_err(source),
            HeadError::Protocol(m) => ClientError::Protocol(m),
        })?;
        let no_body = req.method == "HEAD" || status == 204 || status == 304 || status < 200;
        let framing = if no_body {
            Framing::Done
        } else if find_header(&headers, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked {
                remaining: 0,
                started: false,
            }
        } else if let Some(len) = find_header(&headers, "content-length") {
            let len = len
                .trim()
                .parse()
                .map_err(|_| ClientError::Protocol(format!("bad content-length {len:?}")))?;
            Framing::Length(len)
        } else {
            Framing::Eof
        };
        Ok(StreamingResponse {
            status,
            headers,
            reader,
            framing,
            addr,
        })
    }

    fn request_head(&self, req: &Request) -> String {
        let mut head = format!(
            "{} {}{} HTTP/1.1\r\nhost: {}\r\nuser-agent: codemantle/{}\r\nconnection: close\r\n",
            req.method,
            self.url.base_path,
            req.path,
            self.url.authority(),
            env!("CARGO_PKG_VERSION"),
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("authorization: Bearer {token}\r\n"));
        }
        for (k, v) in &req.headers {
            // Header injection guard: values with CR/LF are dropped.
            if !k.contains(['\r', '\n']) && !v.contains(['\r', '\n']) {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        let len = req.body.as_ref().map_or(0, Vec::len);
        if req.body.is_some() || !matches!(req.method.as_str(), "GET" | "HEAD") {
            head.push_str(&format!("content-length: {len}\r\n"));
        }
        head.push_str("\r\n");
        head
    }
}

enum HeadError {
    Io(io::Error),
    Protocol(String),
}

async fn read_head(
    reader: &mut BufReader<Box<dyn Io>>,
) -> Result<(u16, Vec<(String, String)>), HeadError> {
    const MAX_HEAD: usize = 64 * 1024;
    let mut total = 0;
    let mut line = String::new();
    let mut read_line = async |line: &mut String| -> Result<(), HeadError> {
        line.clear();
        let n = reader.read_line(line).await.map_err(HeadError::Io)?;
        total += n;
        if n == 0 {
            return Err(HeadError::Protocol(
                "the connection closed before the response head".into(),
            ));
        }
        if total > MAX_HEAD {
            return Err(HeadError::Protocol(
                "the response head is larger than 64 KiB".into(),
            ));
        }
        Ok(())
    };
    read_line(&mut line).await?;
    let mut parts = line.trim_end().splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        return Err(HeadError::Protocol(format!(
            "unexpected status line {:?}",
            line.trim_end()
        )));
    }
    let status = code
        .parse()
        .map_err(|_| HeadError::Protocol(format!("bad status code {code:?}")))?;
    let mut headers = Vec::new();
    loop {
        read_line(&mut line).await?;
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| HeadError::Protocol(format!("bad header line {l:?}")))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok((status, headers))
}

enum Framing {
    Length(u64),
    Chunked { remaining: u64, started: bool },
    Eof,
    Done,
}

/// A response whose body is read incrementally (SSE, large downloads).
pub struct StreamingResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<Box<dyn Io>>,
    framing: Framing,
    addr: String,
}

impl StreamingResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The next piece of the body, `None` at its end.
    pub async fn read_chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        let addr = self.addr.clone();
        self.read_chunk_io()
            .await
            .map_err(|source| ClientError::Io { addr, source })
    }

    async fn read_chunk_io(&mut self) -> io::Result<Option<Vec<u8>>> {
        const PIECE: u64 = 16 * 1024;
        let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended early");
        loop {
            match &mut self.framing {
                Framing::Done | Framing::Length(0) => return Ok(None),
                Framing::Length(remaining) => {
                    let mut buf = vec![0; (*remaining).min(PIECE) as usize];
                    let n = self.reader.read(&mut buf).await?;
                    if n == 0 {
                        return Err(eof());
                    }
                    *remaining -= n as u64;
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Framing::Eof => {
                    let mut buf = vec![0; PIECE as usize];
                    let n = self.reader.read(&mut buf).await?;
                    if n == 0 {
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Framing::Chunked { remaining, started } => {
                    if *remaining == 0 {
                        let mut line = String::new();
                        if *started {
                            // CRLF after the previous chunk's data.
                            self.reader.read_line(&mut line).await?;
                            line.clear();
                        }
                        *started = true;
                        if self.reader.read_line(&mut line).await? == 0 {
                            return Err(eof());
                        }
                        let size_hex = line.trim().split(';').next().unwrap_or("");
                        let size = u64::from_str_radix(size_hex, 16).map_err(|_| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("bad chunk size {size_hex:?}"),
                            )
                        })?;
                        if size == 0 {
                            // Trailers until an empty line.
                            loop {
                                line.clear();
                                let n = self.reader.read_line(&mut line).await?;
                                if n == 0 || line.trim().is_empty() {
                                    break;
                                }
                            }
                            self.framing = Framing::Done;
                            return Ok(None);
                        }
                        *remaining = size;
                        continue;
                    }
                    let mut buf = vec![0; (*remaining).min(PIECE) as usize];
                    let n = self.reader.read(&mut buf).await?;
                    if n == 0 {
                        return Err(eof());
                    }
                    *remaining -= n as u64;
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
            }
        }
    }

    /// Reads the rest of the body.
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut body = Vec::new();
        while let Some(chunk) = self.read_chunk().await? {
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Turns a `text/event-stream` body into an event reader.
    pub fn into_sse(self) -> SseReader {
        SseReader {
            response: self,
            buffer: Vec::new(),
        }
    }
}

/// One server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Parses `text/event-stream` (comments and `retry:` are skipped).
pub struct SseReader {
    response: StreamingResponse,
    buffer: Vec<u8>,
}

impl SseReader {
    /// The next event, `None` when the stream ended.
    pub async fn next_event(&mut self) -> Result<Option<SseEvent>, ClientError> {
        loop {
            if let Some(end) = find_blank_line(&self.buffer) {
                let block: Vec<u8> = self.buffer.drain(..end.1).collect();
                let text = String::from_utf8_lossy(&block[..end.0]);
                if let Some(ev) = parse_sse_block(&text) {
                    return Ok(Some(ev));
                }
                continue;
            }
            match self.response.read_chunk().await? {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }
}

/// (end of block content, end including the blank line)
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse_sse_block(block: &str) -> Option<SseEvent> {
    let mut ev = SseEvent::default();
    let mut data_lines = Vec::new();
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => ev.id = Some(value.to_owned()),
            "event" => ev.event = Some(value.to_owned()),
            "data" => data_lines.push(value.to_owned()),
            _ => {}
        }
    }
    if data_lines.is_empty() && ev.id.is_none() && ev.event.is_none() {
        return None;
    }
    ev.data = data_lines.join("\n");
    Some(ev)
}

fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let env_file = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let candidates: Vec<std::path::PathBuf> = match ca_file {
        Some(p) => vec![p.to_owned()],
        None => env_file
            .into_iter()
            .chain(
                [
                    "/etc/ssl/certs/ca-certificates.crt",
                    "/etc/pki/tls/certs/ca-bundle.crt",
                    "/etc/ssl/ca-bundle.pem",
                    "/etc/ssl/cert.pem",
                ]
                .map(std::path::PathBuf::from),
            )
            .collect(),
    };
    let mut roots = rustls::RootCertStore::empty();
    let mut pinned = Vec::new();
    for path in &candidates {
        let Ok(certs) = crate::api::tls::read_certs(path) else {
            if ca_file.is_some() {
                return Err(ClientError::Tls(format!(
                    "cannot read CA certificates from {}",
                    path.display()
                )));
            }
            continue;
        };
        if ca_file.is_some() {
            pinned.clone_from(&certs);
        }
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added > 0 {
            break;
        }
    }
    if roots.is_empty() {
        return Err(ClientError::Tls(
            "no CA certificates found for https: pass --ca-cert FILE (the server's CA or \
             self-signed certificate) or set SSL_CERT_FILE"
                .into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| ClientError::Tls(e.to_string()))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinningVerifier { webpki, pinned }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Standard WebPKI verification, plus: a server certificate that is byte-for-byte one of the
/// certificates in the operator's `--ca-cert` file is accepted as pinned. Lab servers often
/// use a self-signed certificate made with `openssl req -x509`, which is marked as a CA and
/// which WebPKI therefore refuses as a server certificate; pinning the exact certificate is as
/// strong as trusting it as a root. Handshake signatures are always checked.
#[derive(Debug)]
struct PinningVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = ServerUrl::parse("https://cp.example:9443/base/").expect("valid");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.base_path.as_str()),
            (true, "cp.example", 9443, "/base")
        );
        let u = ServerUrl::parse("http://[::1]:8787").expect("valid");
        assert_eq!(
            (u.host.as_str(), u.port, u.authority()),
            ("::1", 8787, "[::1]:8787".into())
        );
        assert_eq!(ServerUrl::parse("http://h").expect("valid").port, 80);
        assert!(ServerUrl::parse("ftp://h").is_err());
        assert!(ServerUrl::parse("http://h:x").is_err());
    }

    #[test]
    fn parses_sse_blocks() {
        let ev = parse_sse_block("id: 7\nevent: device.added\ndata: {\"a\":1}").expect("event");
        assert_eq!(
            ev,
            SseEvent {
                id: Some("7".into()),
                event: Some("device.added".into()),
                data: "{\"a\":1}".into()
            }
        );
        assert!(parse_sse_block(": keepalive").is_none());
        assert_eq!(find_blank_line(b"a\n\nb"), Some((1, 3)));
    }
}
