//! A mock OpenAI-compatible LLM on 127.0.0.1, so the real `opencode serve` can answer a prompt
//! with no network: OpenCode's bundled `@ai-sdk/openai-compatible` provider is pointed at it
//! through an inline config ([`MockLlm::opencode_config`], for `OPENCODE_CONFIG_CONTENT`).
//!
//! Routes (HTTP/1.1, one request per connection, `Connection: close`):
//!
//! - `POST /v1/chat/completions`: with `"stream": true`, an SSE response of
//!   `chat.completion.chunk` records whose `choices[0].delta.content` pieces (one per word) make
//!   up the reply, then a record with `finish_reason: "stop"` and `usage`, then `data: [DONE]`;
//!   without it, one `chat.completion` JSON. The reply is [`MockLlm::reply`], except for
//!   OpenCode's title-generator call (its system prompt says "title generator"), which gets
//!   [`TITLE_REPLY`], so a test can tell the agent's answer from the session title.
//! - `GET /v1/models`: the one model, `mock-1`.
//! - anything else: `404` with an OpenAI-style error body.
//!
//! Every request is logged (method, path, body) and can be read back with
//! [`MockLlm::requests`]; when a test fails it can print what OpenCode asked for.
//!
//! SAFETY: binds only `127.0.0.1:0` (a free port), writes nothing to disk; the accept thread
//! stops when the [`MockLlm`] is dropped.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

/// The model id the mock serves (provider `mock`, so OpenCode's model is `mock/mock-1`).
pub const MODEL: &str = "mock-1";
/// What the title-generator call gets.
pub const TITLE_REPLY: &str = "Mock session title";
/// Largest request body read (OpenCode's agent prompt with tool definitions is ~100 KB).
const MAX_BODY: usize = 16 << 20;

/// One request the mock received.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub body: String,
}

/// The running mock; stops on drop.
pub struct MockLlm {
    port: u16,
    reply: String,
    requests: Arc<Mutex<Vec<LoggedRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MockLlm {
    /// Listens on a free port of 127.0.0.1 and answers every completion with `reply`.
    pub fn start(reply: &str) -> MockLlm {
        let listener = TcpListener::bind("127.0.0.1:0").expect("mock LLM: bind 127.0.0.1:0");
        let port = listener.local_addr().expect("mock LLM: local addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let requests = Arc::clone(&requests);
            let stop = Arc::clone(&stop);
            let reply = reply.to_owned();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let requests = Arc::clone(&requests);
                    let reply = reply.clone();
                    std::thread::spawn(move || {
                        let _ = handle(conn, &reply, &requests);
                    });
                }
            })
        };
        MockLlm {
            port,
            reply: reply.to_owned(),
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The agent's answer to every prompt.
    pub fn reply(&self) -> &str {
        &self.reply
    }

    /// `http://127.0.0.1:<port>/v1`, the provider's `baseURL`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// An OpenCode config (the JSON for `OPENCODE_CONFIG_CONTENT`) whose model and small model
    /// are `mock/mock-1`, served by this mock through `@ai-sdk/openai-compatible`.
    pub fn opencode_config(&self) -> Value {
        json!({
            "model": format!("mock/{MODEL}"),
            "small_model": format!("mock/{MODEL}"),
            "provider": {
                "mock": {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": "Mock",
                    "options": { "baseURL": self.base_url(), "apiKey": "mock-key" },
                    "models": { MODEL: { "name": "Mock 1" } }
                }
            }
        })
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request(conn: &TcpStream) -> std::io::Result<Option<LoggedRequest>> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut length = 0usize;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.eq_ignore_ascii_case("chunked")
            {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size_hex = size_line.trim().split(';').next().unwrap_or("0");
            let size = usize::from_str_radix(size_hex, 16).unwrap_or(0);
            if size == 0 {
                let mut trailer = String::new();
                reader.read_line(&mut trailer)?;
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(std::io::Error::other("mock LLM: request body too large"));
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else {
        body.resize(length.min(MAX_BODY), 0);
        reader.read_exact(&mut body)?;
    }
    Ok(Some(LoggedRequest {
        method,
        path,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

fn handle(
    mut conn: TcpStream,
    reply: &str,
    requests: &Mutex<Vec<LoggedRequest>>,
) -> std::io::Result<()> {
    let Some(req) = read_request(&conn)? else {
        return Ok(());
    };
    requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(req.clone());
    let path = req.path.split('?').next().unwrap_or("");
    match (req.method.as_str(), path) {
        ("POST", "/v1/chat/completions") => {
            let parsed: Value = serde_json::from_str(&req.body).unwrap_or(Value::Null);
            let text = if req.body.contains("title generator") {
                TITLE_REPLY
            } else {
                reply
            };
            if parsed["stream"] == json!(true) {
                stream_completion(&mut conn, text)?;
            } else {
                let body = json!({
                    "id": "chatcmpl-mock",
                    "object": "chat.completion",
                    "created": 1_700_000_000u64,
                    "model": MODEL,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop"
                    }],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                });
                respond(&mut conn, "200 OK", &body.to_string())?;
            }
        }
        ("GET", "/v1/models") => {
            let body = json!({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "mock"}]});
            respond(&mut conn, "200 OK", &body.to_string())?;
        }
        _ => {
            let body = json!({"error": {"message": format!("mock LLM has no route {} {}", req.method, path), "type": "invalid_request_error"}});
            respond(&mut conn, "404 Not Found", &body.to_string())?;
        }
    }
    let _ = conn.shutdown(Shutdown::Both);
    Ok(())
}

/// The reply as `chat.completion.chunk` SSE records, one word (with its trailing space) each.
fn stream_completion(conn: &mut TcpStream, text: &str) -> std::io::Result<()> {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
    conn.write_all(head.as_bytes())?;
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000u64,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        })
    };
    let mut records = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for piece in text.split_inclusive(' ') {
        records.push(chunk(json!({"content": piece}), Value::Null));
    }
    let mut last = chunk(json!({}), json!("stop"));
    last["usage"] = json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15});
    records.push(last);
    for r in records {
        write!(conn, "data: {r}\n\n")?;
        conn.flush()?;
    }
    conn.write_all(b"data: [DONE]\n\n")?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(port: u16, body: &str) -> String {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            c,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn streams_the_reply_word_by_word_and_logs_requests() {
        let mock = MockLlm::start("Hello from the mock.");
        let out = post(
            mock.port(),
            r#"{"model":"mock-1","stream":true,"messages":[]}"#,
        );
        let deltas: String = out
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(deltas, "Hello from the mock.");
        assert!(out.contains(r#""finish_reason":"stop""#));
        assert!(out.trim_end().ends_with("data: [DONE]"));
        let title = post(
            mock.port(),
            r#"{"stream":false,"messages":[{"role":"system","content":"You are a title generator"}]}"#,
        );
        assert!(title.contains(TITLE_REPLY), "{title}");
        let logged = mock.requests();
        assert_eq!(logged.len(), 2);
        assert_eq!(logged[0].path, "/v1/chat/completions");
        assert!(logged[1].body.contains("title generator"));
    }
}
