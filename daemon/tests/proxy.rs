//! The port proxy against real HTTP servers on loopback: `pr` to an exposed port comes back as
//! `pv` (status, headers, body) — buffered when small, streamed as `pv ss:1` + `ps`* + `pe`
//! when chunked (an SSE stream arrives event by event, each before the server sends the next);
//! a port that is neither exposed nor a session's is refused with `e AUTH`; oversize headers
//! with `e LIMIT`; a body above the wire limit cannot even be encoded. Backpressure: with
//! nobody draining the link's stream lane an endless upstream stalls (bounded memory), and it
//! resumes when the lane is drained; `pe` from the control plane stops the stream and closes
//! the upstream connection.
//!
//! SAFETY: every server binds 127.0.0.1:0; nothing touches the file system.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use codemantle_daemon::dispatch::{Outbound, Peer};
use codemantle_daemon::proxy::{Proxy, ProxySettings};
use codemantle_protocol::codec::{self, Codec};
use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::limits;
use codemantle_protocol::message::{Header, Message, ProxyRequest};
use futures_lite::FutureExt as _;

/// A request as the tiny server saw it.
#[derive(Debug)]
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Serves every connection on a thread with `handler`; returns the port and what it saw.
fn server(
    handler: impl Fn(&mut TcpStream, &Seen) + Send + Sync + 'static,
) -> (u16, mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (tx, handler) = (tx.clone(), handler.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (n, v) = h.split_once(':').unwrap();
                    headers.push((n.to_ascii_lowercase(), v.trim().to_owned()));
                }
                let len = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .map_or(0, |(_, v)| v.parse().unwrap());
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let seen = Seen {
                    line: line.trim_end().to_owned(),
                    headers,
                    body,
                };
                handler(&mut conn, &seen);
                let _ = tx.send(seen);
            });
        }
    });
    (port, rx)
}

thread_local! {
    static REPLIES: std::cell::RefCell<Vec<async_channel::Receiver<Message>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn proxy(ports: &[u16]) -> Proxy {
    Proxy::new(
        ProxySettings {
            exposed_ports: ports.to_vec(),
            ..ProxySettings::default()
        },
        None,
    )
}

/// A peer whose stream lane holds `lane` frames; returns it and the lane's receiving end.
fn peer(lane: usize) -> (Peer, async_channel::Receiver<Message>) {
    peer_on("link-1", lane)
}

/// [`peer`] on the link with session id `sid`.
fn peer_on(sid: &str, lane: usize) -> (Peer, async_channel::Receiver<Message>) {
    peer_with(Codec::Cbor, sid, lane)
}

/// A peer speaking `codec` (JSON: a 0.1.x control plane, which grants no `pw` credit).
fn peer_with(codec: Codec, sid: &str, lane: usize) -> (Peer, async_channel::Receiver<Message>) {
    let (tx, rx) = async_channel::unbounded();
    let (lane_tx, lane_rx) = async_channel::bounded(lane);
    // The reply channel stays open for the test's duration (nothing is sent on it here).
    REPLIES.with(|r| r.borrow_mut().push(rx));
    let peer = Peer {
        codec,
        sid: sid.to_owned(),
        outbound: Some(Outbound::new(tx).with_stream_lane(lane_tx)),
    };
    (peer, lane_rx)
}

fn pr(id: u32, port: u16, method: &str, target: &str, headers: &[(&str, &str)]) -> ProxyRequest {
    ProxyRequest {
        request_id: id,
        port,
        method: method.to_owned(),
        target: target.to_owned(),
        headers: headers.iter().map(|(n, v)| Header::new(*n, *v)).collect(),
        body: Vec::new(),
    }
}

/// The next frame from the lane (panics after 10 s: a hang is a failure, not a figure).
fn next(lane: &async_channel::Receiver<Message>) -> Message {
    smol::block_on(async { lane.recv().await.expect("lane closed") }.or(async {
        smol::Timer::after(Duration::from_secs(10)).await;
        panic!("no frame within 10 s");
    }))
}

fn header<'a>(h: &'a [Header], name: &str) -> Option<&'a str> {
    h.iter().find(|x| x.name == name).map(|x| x.value.as_str())
}

#[test]
fn a_small_answer_comes_back_whole_with_status_headers_and_body() {
    let (port, seen) = server(|conn, req| {
        let body = format!("you sent {} bytes", req.body.len());
        write!(
            conn,
            "HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nX-Upstream: yes\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    });
    let (peer, _lane) = peer(4);
    let mut req = pr(
        7,
        port,
        "POST",
        "/api/items?x=1",
        &[
            ("content-type", "application/json"),
            ("accept-encoding", "gzip"),
            ("connection", "upgrade"),
        ],
    );
    req.body = b"{\"a\":1}".to_vec();
    let reply = smol::block_on(proxy(&[port]).handle(req, &peer)).expect("a reply");
    let Message::ProxyResponse(pv) = reply else {
        panic!("not a pv: {reply:?}")
    };
    assert_eq!(pv.request_id, 7);
    assert!(pv.ok, "{pv:?}");
    assert!(!pv.streaming);
    assert_eq!(pv.status, Some(201));
    assert_eq!(pv.status_text.as_deref(), Some("Created"));
    let h = pv.headers.unwrap();
    assert_eq!(header(&h, "x-upstream"), Some("yes"));
    assert_eq!(header(&h, "content-type"), Some("text/plain"));
    assert_eq!(header(&h, "connection"), None, "hop-by-hop header passed");
    assert_eq!(pv.body.as_deref(), Some(&b"you sent 7 bytes"[..]));

    let seen = seen.recv().unwrap();
    assert_eq!(seen.line, "POST /api/items?x=1 HTTP/1.1");
    assert_eq!(seen.body, b"{\"a\":1}");
    let names: Vec<&str> = seen.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"content-type"));
    assert!(!names.contains(&"accept-encoding"), "{names:?}");
    assert!(
        seen.headers
            .iter()
            .any(|(n, v)| n == "host" && v == &format!("127.0.0.1:{port}"))
    );
    assert!(
        seen.headers
            .iter()
            .any(|(n, v)| n == "connection" && v == "close")
    );
}

#[test]
fn an_sse_stream_arrives_event_by_event() {
    // The server sends each event only after the test saw the previous one as a `ps`.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let (port, _seen) = server(move |conn, _| {
        conn.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap();
        for i in 0..3 {
            go_rx.lock().unwrap().recv().unwrap();
            let event = format!("data: event {i}\n\n");
            write!(conn, "{:x}\r\n{event}\r\n", event.len()).unwrap();
            conn.flush().unwrap();
        }
        conn.write_all(b"0\r\n\r\n").unwrap();
    });
    let (peer, lane) = peer(4);
    let reply = smol::block_on(proxy(&[port]).handle(pr(9, port, "GET", "/event", &[]), &peer));
    assert!(reply.is_none(), "streamed answers go through the lane");
    let Message::ProxyResponse(pv) = next(&lane) else {
        panic!("first frame is not pv")
    };
    assert!(pv.ok && pv.streaming, "{pv:?}");
    assert_eq!(pv.status, Some(200));
    let h = pv.headers.unwrap();
    assert_eq!(header(&h, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&h, "transfer-encoding"), None);
    for i in 0..3 {
        go_tx.send(()).unwrap();
        let Message::ProxyChunk(ps) = next(&lane) else {
            panic!("expected ps {i}")
        };
        assert_eq!(ps.request_id, 9);
        assert_eq!(ps.data, format!("data: event {i}\n\n").into_bytes());
    }
    let Message::ProxyEnd(pe) = next(&lane) else {
        panic!("expected pe")
    };
    assert_eq!(pe.request_id, 9);
}

#[test]
fn ports_requests_and_headers_outside_the_rules_are_refused() {
    let (port, _seen) = server(|conn, _| {
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    });
    let (peer, _lane) = peer(4);
    let p = proxy(&[port]);
    let refused = |req: ProxyRequest| -> (ErrorCode, String) {
        match smol::block_on(p.handle(req, &peer)) {
            Some(Message::Error(e)) => (e.code, e.message.unwrap_or_default()),
            other => panic!("not refused: {other:?}"),
        }
    };
    // A port that is listening but neither exposed nor a session's.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let (code, m) = refused(pr(1, other_port, "GET", "/", &[]));
    assert_eq!(code, ErrorCode::Auth);
    assert!(m.starts_with("port_not_exposed"), "{m}");

    let (code, m) = refused(pr(2, port, "TRACE", "/", &[]));
    assert_eq!(code, ErrorCode::Limit);
    assert!(m.starts_with("method_not_allowed"), "{m}");

    let big = "v".repeat(limits::HEADER_VALUE.max);
    let many: Vec<(&str, &str)> = (0..10).map(|_| ("x-big", big.as_str())).collect();
    let (code, m) = refused(pr(3, port, "GET", "/", &many));
    assert_eq!(code, ErrorCode::Limit);
    assert!(m.starts_with("headers_too_large"), "{m}");

    let (code, m) = refused(pr(4, port, "GET", "/ HTTP/1.1\r\nX: y", &[]));
    assert_eq!(code, ErrorCode::Proto);
    assert!(m.starts_with("invalid_target"), "{m}");

    // Beyond the wire limits the frame cannot be built (the control plane gets a 400 before
    // sending), and a peer sending one anyway has it refused at decode.
    let mut huge = pr(5, port, "POST", "/", &[]);
    huge.body = vec![b'x'; limits::MAX_PROXY_REQUEST_BYTES + 1];
    assert!(codec::encode(&Message::ProxyRequest(huge), Codec::Cbor).is_err());
    let too_many: Vec<(&str, &str)> = (0..limits::MAX_HEADERS + 1).map(|_| ("x", "1")).collect();
    assert!(
        codec::encode(
            &Message::ProxyRequest(pr(6, port, "GET", "/", &too_many)),
            Codec::Cbor
        )
        .is_err()
    );

    // A closed port is not refused but fails upstream: `pv o:0` naming the port.
    drop(other);
    let p2 = proxy(&[other_port]);
    match smol::block_on(p2.handle(pr(7, other_port, "GET", "/", &[]), &peer)) {
        Some(Message::ProxyResponse(pv)) => {
            assert!(!pv.ok);
            let m = pv.error.unwrap();
            assert!(m.starts_with("upstream_unreachable"), "{m}");
            assert!(m.contains(&other_port.to_string()), "{m}");
        }
        other => panic!("expected pv o:0: {other:?}"),
    }
}

/// Waits until `counter` stops moving for 300 ms (the upstream is blocked) and returns it; or
/// returns as soon as it passes `MAX_STALLED` (no backpressure: the test fails).
fn settled(counter: &AtomicU64) -> u64 {
    let mut last = counter.load(Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = counter.load(Ordering::SeqCst);
        if (now == last && now > 0) || now >= MAX_STALLED {
            return now;
        }
        last = now;
    }
}

#[test]
fn a_native_control_plane_paces_a_stream_with_credit() {
    let (port, _seen) = server(move |conn, _| {
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            .unwrap();
        let block = vec![b'c'; 16 * 1024];
        while conn.write_all(&block).is_ok() {}
    });
    // A lane far larger than the window: only credit can stop the pump.
    let (peer, lane) = peer_on("link-1", 4096);
    let p = proxy(&[port]);
    assert!(smol::block_on(p.handle(pr(21, port, "GET", "/", &[]), &peer)).is_none());
    assert!(matches!(next(&lane), Message::ProxyResponse(_)));
    let window = codemantle_daemon::proxy::STREAM_WINDOW_BYTES as usize;
    let chunk = codemantle_daemon::proxy::CHUNK_BYTES;
    // Read until the pump stops for want of credit (no frame for 300 ms).
    let drain = |lane: &async_channel::Receiver<Message>| -> usize {
        let mut got = 0;
        loop {
            let frame = smol::block_on(async { lane.recv().await.ok() }.or(async {
                smol::Timer::after(Duration::from_millis(300)).await;
                None
            }));
            match frame {
                Some(Message::ProxyChunk(ps)) => got += ps.data.len(),
                Some(other) => panic!("unexpected {other:?}"),
                None => return got,
            }
        }
    };
    let first = drain(&lane);
    assert!(
        (window..window + chunk).contains(&first),
        "sent {first} bytes on a {window}-byte window"
    );
    // One grant lets exactly that much more through (give or take a chunk).
    p.credit("link-1", 21, 1024 * 1024);
    let second = drain(&lane);
    assert!(
        second <= 1024 * 1024 + chunk && second + chunk >= 1024 * 1024 - (first - window),
        "sent {second} more bytes on a 1 MiB grant"
    );
    p.cancel("link-1", 21);
    drop((peer, lane));
}

#[test]
fn a_new_link_ends_the_streams_of_the_old_one() {
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let closed_tx = std::sync::Mutex::new(closed_tx);
    let (port, _seen) = server(move |conn, seen| {
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            .unwrap();
        // An idle event stream: a comment now and then, until the proxy hangs up.
        while conn.write_all(b": ping\n\n").is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
        if seen.line.starts_with("GET /old") {
            let _ = closed_tx.lock().unwrap().send(());
        }
    });
    let p = proxy(&[port]);
    let (old_peer, old_lane) = peer_on("link-1", 64);
    assert!(smol::block_on(p.handle(pr(1, port, "GET", "/old", &[]), &old_peer)).is_none());
    assert!(matches!(next(&old_lane), Message::ProxyResponse(_)));
    // The control plane reconnected (new handshake, new sid) and asks again.
    let (new_peer, new_lane) = peer_on("link-2", 64);
    assert!(smol::block_on(p.handle(pr(1, port, "GET", "/new", &[]), &new_peer)).is_none());
    assert!(matches!(next(&new_lane), Message::ProxyResponse(_)));
    closed_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the old link's upstream was not closed");
    // The old pump releases its slot right after hanging up; the new link's stream goes on.
    let mut n = 0;
    while p.open_streams() != 1 {
        std::thread::sleep(Duration::from_millis(20));
        n += 1;
        assert!(n < 500, "open streams: {}", p.open_streams());
    }
    drop((old_peer, old_lane, new_peer, new_lane));
}

/// More than the lane, the socket buffers and a chunk in flight can hold.
const MAX_STALLED: u64 = 64 * 1024 * 1024;

#[test]
fn an_endless_stream_waits_for_the_link_and_stops_on_cancel() {
    let written = Arc::new(AtomicU64::new(0));
    let (closed_tx, closed_rx) = mpsc::channel::<u64>();
    let w = written.clone();
    let (port, _seen) = server(move |conn, _| {
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            .unwrap();
        let block = vec![b'z'; 16 * 1024];
        // Until-close body that never ends on its own.
        while conn.write_all(&block).is_ok() {
            w.fetch_add(block.len() as u64, Ordering::SeqCst);
        }
        let _ = closed_tx.send(w.load(Ordering::SeqCst));
    });
    // A 0.1.x peer: no credit window, only the link's lane paces the stream.
    let (peer, lane) = peer_with(Codec::Json, "link-1", 2);
    let p = proxy(&[port]);
    assert!(smol::block_on(p.handle(pr(11, port, "GET", "/big", &[]), &peer)).is_none());
    let Message::ProxyResponse(pv) = next(&lane) else {
        panic!("first frame is not pv")
    };
    assert!(pv.streaming);
    assert_eq!(p.open_streams(), 1);

    // Nobody drains the lane: the upstream stalls once the lane and the socket buffers are
    // full. Loopback socket buffers are a few MiB; an unbounded proxy would read on forever.
    let stalled = settled(&written);
    eprintln!("upstream stalled after {stalled} bytes");
    assert!(
        stalled < MAX_STALLED,
        "upstream wrote {stalled} bytes with nobody reading"
    );

    // Draining lets it go on.
    let mut got = 0u64;
    while got < stalled + 1024 * 1024 {
        match next(&lane) {
            Message::ProxyChunk(ps) => {
                assert!(ps.data.len() <= codemantle_daemon::proxy::CHUNK_BYTES);
                got += ps.data.len() as u64;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(written.load(Ordering::SeqCst) > stalled);

    // `pe` from the control plane ends it, even while the pump waits for room in the full
    // lane (nobody drains it now): the upstream connection is closed.
    p.cancel("link-1", 11);
    let total = closed_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("upstream connection not closed after cancel");
    assert!(total >= stalled);
    drop((peer, lane));
    // The stream's slot is released.
    let mut n = 0;
    while p.open_streams() != 0 {
        std::thread::sleep(Duration::from_millis(20));
        n += 1;
        assert!(n < 500, "stream slot never released");
    }
}

/// Figure, not a check: MB/s of a 256 MiB until-close body through the proxy's pump and the
/// stream lane, each frame CBOR-encoded as the link would. Run with
/// `cargo test --release -p codemantle-daemon --test proxy -- --ignored --nocapture`.
#[test]
#[ignore = "prints a throughput figure"]
fn throughput_figure() {
    const TOTAL: usize = 256 * 1024 * 1024;
    let (port, _seen) = server(|conn, _| {
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            .unwrap();
        let block = vec![b'z'; 256 * 1024];
        for _ in 0..TOTAL / block.len() {
            if conn.write_all(&block).is_err() {
                return;
            }
        }
    });
    let (peer, lane) = peer(codemantle_daemon::proxy::STREAM_LANE_FRAMES);
    let p = proxy(&[port]);
    let started = std::time::Instant::now();
    assert!(smol::block_on(p.handle(pr(1, port, "GET", "/", &[]), &peer)).is_none());
    let mut bytes = 0usize;
    let mut frames = 0usize;
    let mut uncredited = 0usize;
    loop {
        let msg = next(&lane);
        let encoded = codec::encode(&msg, Codec::Cbor).unwrap();
        frames += 1;
        match msg {
            Message::ProxyChunk(ps) => {
                bytes += ps.data.len();
                // Credit back as a control plane does, every 256 KiB taken.
                uncredited += ps.data.len();
                if uncredited >= 256 * 1024 {
                    p.credit("link-1", 1, uncredited as u32);
                    uncredited = 0;
                }
            }
            Message::ProxyEnd(_) => break,
            Message::ProxyResponse(_) => {}
            other => panic!("unexpected {other:?}"),
        }
        drop(encoded);
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(bytes, TOTAL);
    println!(
        "proxy pump: {} MiB in {frames} frames, {secs:.2} s = {:.0} MB/s",
        bytes >> 20,
        bytes as f64 / secs / 1e6
    );
}
