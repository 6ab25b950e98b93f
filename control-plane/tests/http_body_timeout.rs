//! Slow HTTP clients are cut off: a request body that stops, or trickles, past the configured
//! body timeout gets 408 `request_timeout` (JSON error body) and its connection is closed;
//! headers that never finish get the connection closed. Real server on 127.0.0.1, raw TCP
//! client (so the test controls exactly which bytes are sent when), real sled data dir.
//!
//! The timeouts are short (so the suite stays fast) and every read has a generous guard: the
//! tests assert *that* the 408 and the close happen, not how fast.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use codemantle_control_plane::admin;
use codemantle_control_plane::api::{ApiOptions, App, Server};
use codemantle_control_plane::store::Store;
use codemantle_control_plane::store::sled::SledStore;
use serde_json::Value;

/// Longest any read waits: far above the configured timeouts, only there so that a server
/// that never answers fails the test instead of hanging it.
const HANG_GUARD: Duration = Duration::from_secs(30);

struct TestServer {
    addr: SocketAddr,
    owner: String,
    _dir: tempfile::TempDir,
}

fn start(body_timeout: Duration, header_timeout: Duration) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let sled = SledStore::open(&dir.path().join("data")).expect("open store");
    let owner = admin::init(&sled).expect("init").bearer;
    let store: Arc<dyn Store> = Arc::new(sled);
    let mut app = App::new(store);
    app.options = ApiOptions {
        body_timeout,
        header_timeout,
        ..ApiOptions::default()
    };
    let server = smol::block_on(Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        None,
        Arc::new(app),
    ))
    .expect("bind");
    let addr = server.local_addr().expect("addr");
    smol::spawn(server.run()).detach();
    TestServer {
        addr,
        owner,
        _dir: dir,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(HANG_GUARD)).expect("read timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Headers of `POST /tokens` announcing a body of `length` bytes.
fn token_create_head(server: &TestServer, length: usize) -> String {
    format!(
        "POST /tokens HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n",
        server.addr, server.owner
    )
}

/// A parsed response: status, lower-cased headers, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

fn parse(bytes: &[u8]) -> Answer {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head in {:?}",
                String::from_utf8_lossy(bytes)
            )
        });
    let head = std::str::from_utf8(&bytes[..end]).expect("UTF-8 head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: bytes[end + 4..].to_vec(),
    }
}

/// Reads until the server closes the connection; panics if it does not within the guard.
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A reset after the answer also means closed (we may still have been writing).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!(
                "the server did not close the connection ({e}); got so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

fn assert_timed_out(answer: &Answer) {
    assert_eq!(
        answer.status,
        408,
        "body: {}",
        String::from_utf8_lossy(&answer.body)
    );
    let body = answer.json();
    assert_eq!(body["error"], "request_timeout", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("body")),
        "the message should say what happened: {body}"
    );
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(
        answer
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{:?}",
        answer.headers
    );
}

#[test]
fn a_body_that_stops_gets_408_and_the_connection_is_closed() {
    let server = start(Duration::from_millis(300), Duration::from_secs(30));
    let mut s = connect(server.addr);
    // 64 bytes announced, 10 sent, then silence (the socket stays open on our side).
    s.write_all(token_create_head(&server, 64).as_bytes())
        .expect("write head");
    s.write_all(br#"{"name":"t"#)
        .expect("write part of the body");
    let answer = parse(&read_until_closed(&mut s));
    assert_timed_out(&answer);
}

#[test]
fn a_trickling_body_gets_408_and_the_connection_is_closed() {
    let server = start(Duration::from_millis(300), Duration::from_secs(30));
    let mut s = connect(server.addr);
    s.write_all(token_create_head(&server, 100_000).as_bytes())
        .expect("write head");
    // One byte every 20 ms: the connection is never idle, the body just never completes.
    let done = Arc::new(AtomicBool::new(false));
    let mut writer = s.try_clone().expect("clone");
    let trickle = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut sent = 0usize;
            while !done.load(Ordering::Relaxed) && sent < 100_000 {
                if writer.write_all(b" ").is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            sent
        })
    };
    let answer = parse(&read_until_closed(&mut s));
    done.store(true, Ordering::Relaxed);
    let sent = trickle.join().expect("trickle thread");
    assert_timed_out(&answer);
    assert!(
        sent > 0,
        "the body was trickling when the server cut it off"
    );
}

#[test]
fn bodies_sent_in_time_still_work_on_a_kept_alive_connection() {
    let server = start(Duration::from_millis(300), Duration::from_secs(30));
    let mut s = connect(server.addr);
    for name in ["first", "second"] {
        let body = format!(r#"{{"name":"{name}","role":"viewer"}}"#);
        s.write_all(token_create_head(&server, body.len()).as_bytes())
            .expect("write head");
        s.write_all(body.as_bytes()).expect("write body");
        // Read one response: head, then Content-Length bytes.
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        let answer = loop {
            let n = s.read(&mut buf).expect("read response");
            assert!(n > 0, "the server closed a healthy keep-alive connection");
            bytes.extend_from_slice(&buf[..n]);
            if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                let a = parse(&bytes);
                let length: usize = a
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .expect("content-length");
                if bytes.len() >= end + 4 + length {
                    break a;
                }
            }
        };
        assert_eq!(
            answer.status,
            201,
            "{name}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(
            answer.json()["token"]["name"],
            name,
            "the token was created"
        );
        assert_ne!(answer.header("connection"), Some("close"));
    }
}

#[test]
fn headers_that_never_finish_get_the_connection_closed() {
    let server = start(Duration::from_secs(30), Duration::from_millis(300));
    let mut s = connect(server.addr);
    s.write_all(b"POST /tokens HTTP/1.1\r\nHost: x\r\n")
        .expect("write part of the head");
    let answer = read_until_closed(&mut s);
    // hyper closes without an answer (it has no request to answer yet).
    assert!(
        answer.is_empty() || String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}
