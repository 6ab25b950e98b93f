//! The port proxy end to end with the real binaries: a session started through the API runs
//! the fake OpenCode (through the process guard, as `nobody` when root) on a known port, and
//! `ANY /devices/:id/port/:port/…` reaches it — the daemon adds the session's password, so
//! `GET …/global/health` answers 200 and `POST …/session` creates a session; its `/event` SSE
//! stream comes through event by event; a port that is not the session's is 403
//! `port_not_exposed`; another tenant's token gets 404; the API's token never reaches the
//! upstream. With `preview_host` set, the API origin refuses (421) and
//! `<port>-<device>.<preview_host>` serves the same content (the device id matched
//! case-insensitively, as browsers lower-case host names); nothing else is served there.
//!
//! SAFETY RULES (these tests run as root on a shared machine):
//! - every file a test creates is inside its own temp dirs (the fake OpenCode binary is copied
//!   into the daemon's temp dir; the project root is there and chowned to `nobody`);
//! - the network is 127.0.0.1 only (control plane, fake OpenCode, the refused port's listener).

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::Duration;

use codemantle_control_plane::client::{Client, Request};
use codemantle_tests::bins::bin_path;
use codemantle_tests::harness::{ControlPlane, CpOptions, Daemon, free_port};
use codemantle_tests::session_rig;
use futures_lite::FutureExt as _;
use serde_json::{Value, json};

struct Rig {
    cp: ControlPlane,
    daemon: Daemon,
    device: String,
    port: u16,
}

/// Control plane (with `cp_config`) + daemon + a running session on a known port.
fn start(cp_config: Option<&str>) -> Rig {
    let mut cp = ControlPlane::start_with(CpOptions {
        config: cp_config.map(str::to_owned),
        ..CpOptions::default()
    });
    let creds = cp.add_device("proxy");
    let port = free_port();
    let daemon = Daemon::start_with(&cp.ws_url(), &creds, |dir| {
        session_rig::opencode_config_on(dir, port, "")
    });
    cp.wait_online(&creds.id);
    let (status, body) = cp.post(
        &format!("/devices/{}/session/start", creds.id),
        json!({ "path": "." }),
    );
    assert_eq!(status, 200, "session/start: {body}\n{}", daemon.log());
    Rig {
        cp,
        daemon,
        device: creds.id,
        port,
    }
}

fn get(cp: &ControlPlane, path: &str) -> codemantle_control_plane::client::Response {
    cp.send(Request::new("GET", path))
}

/// One request over a raw socket with any `Host` (the client always sends the server's).
fn raw(cp: &ControlPlane, host: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", cp.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\n{auth}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, head.to_ascii_lowercase(), body)
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = b.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        b = &rest[n + 2..];
    }
}

#[test]
fn the_proxy_reaches_the_sessions_server_and_nothing_else() {
    let Rig {
        mut cp,
        daemon,
        device,
        port,
    } = start(None);
    let base = format!("/devices/{device}/port/{port}");

    // A buffered answer: the daemon authenticated to OpenCode with the session's password.
    let r = get(&cp, &format!("{base}/global/health"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), daemon.log());
    assert_eq!(r.json(), json!({ "healthy": true, "version": "fake" }));
    // On the API origin the page runs sandboxed (an opaque origin of its own).
    let csp = r.header("content-security-policy").unwrap_or("");
    assert!(csp.starts_with("sandbox"), "csp: {csp:?}");

    // A body goes through: POST /session on OpenCode creates a session.
    let r = cp.send(Request::new("POST", &format!("{base}/session")).json(&json!({})));
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap_or("").to_owned();
    assert!(id.starts_with("ses_"), "{}", r.text());

    // SSE streams through, event by event (the fake sends one heartbeat a second).
    let resp = smol::block_on(
        cp.client()
            .open(Request::new("GET", &format!("{base}/event"))),
    )
    .expect("open the event stream");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let mut sse = resp.into_sse();
    let mut types = Vec::new();
    while types.len() < 3 {
        let ev = smol::block_on(async { sse.next_event().await }.or(async {
            smol::Timer::after(Duration::from_secs(20)).await;
            panic!("no SSE event within 20 s")
        }))
        .expect("read")
        .expect("the stream ended");
        let v: Value = serde_json::from_str(&ev.data).expect("json event");
        types.push(v["type"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(types[0], "server.connected");
    assert!(
        types[1..].iter().all(|t| t == "server.heartbeat"),
        "{types:?}"
    );
    drop(sse);

    // A port that is listening but is not the session's: refused by the daemon.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let r = get(&cp, &format!("/devices/{device}/port/{other_port}/"));
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "port_not_exposed");
    for bad in ["0", "70000", "http"] {
        let r = get(&cp, &format!("/devices/{device}/port/{bad}/x"));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_port");
    }
    let r = cp.send(Request::new("TRACE", &format!("{base}/")));
    assert_eq!(r.status, 405, "{}", r.text());
    let r = cp.send(
        Request::new("POST", &format!("{base}/session"))
            .json(&json!({ "pad": "x".repeat(1_600_000) })),
    );
    assert_eq!(r.status, 413, "{}", r.text());

    // Another tenant's operator sees no such device.
    cp.stop();
    let data = cp.data_dir();
    let cli = |args: &[&str]| {
        let out = Command::new(bin_path("codemantle-control-plane"))
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["tenant", "add", "other"]);
    let out = cli(&[
        "token", "create", "--role", "operator", "--tenant", "other", "--name", "o",
    ]);
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("cmt_"))
        .unwrap_or_else(|| panic!("no token in {out:?}"))
        .to_owned();
    cp.spawn();
    cp.wait_online(&device);
    let client = Client::new(&cp.url(), Some(token), None).unwrap();
    let r =
        smol::block_on(client.send(Request::new("GET", &format!("{base}/global/health")))).unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"], "device_not_found");
    drop(daemon);
}

#[test]
fn with_a_preview_host_only_the_preview_origin_serves_proxied_ports() {
    let Rig {
        cp,
        daemon,
        device,
        port,
    } = start(Some("preview_host = \"preview.test\"\n"));

    // The API origin refuses, and says where to go.
    let r = get(&cp, &format!("/devices/{device}/port/{port}/global/health"));
    assert_eq!(r.status, 421, "{}", r.text());
    assert_eq!(r.json()["error"], "preview_origin_required");
    let host = format!("{port}-{}.preview.test", device.to_ascii_lowercase());
    assert!(
        r.json()["message"].as_str().unwrap_or("").contains(&host),
        "{}",
        r.text()
    );

    // The preview host serves it at its own root (device id lower-cased, as browsers do).
    let (status, head, body) = raw(
        &cp,
        &format!("{host}:{}", cp.port),
        "/global/health",
        Some(&cp.token),
    );
    assert_eq!(status, 200, "{head}\n{body}\n{}", daemon.log());
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v, json!({ "healthy": true, "version": "fake" }));
    assert!(!head.contains("content-security-policy: sandbox"), "{head}");

    // Still authenticated there.
    let (status, _, body) = raw(&cp, &host, "/global/health", None);
    assert_eq!(status, 401, "{body}");
    // The bare preview host and other names under it serve nothing — no API either.
    for h in ["preview.test", "x.preview.test"] {
        let (status, _, body) = raw(&cp, h, "/devices", Some(&cp.token));
        assert_eq!(status, 404, "{h}: {body}");
        assert!(body.contains("preview_host_only"), "{body}");
    }
    // The API's own host still serves the API.
    let r = get(&cp, "/devices");
    assert_eq!(r.status, 200);
    drop(daemon);
}

/// Kills the daemon it holds when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Figure, not a check: MB/s of a 256 MiB body from an upstream on an `exposed_ports` port,
/// through the daemon, the tunnel and the control plane, to an API client. Run with
/// `cargo test --release -p codemantle-tests --test e2e_port_proxy -- --ignored --nocapture`
/// (the binaries are the debug ones unless built with `--release` too; see `bins.rs`).
#[test]
#[ignore = "prints a throughput figure"]
fn proxy_throughput_figure() {
    const TOTAL: usize = 256 * 1024 * 1024;
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_port = upstream.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut head = [0u8; 4096];
                let _ = conn.read(&mut head);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {TOTAL}\r\n\r\n"
                );
                let block = vec![b'z'; 256 * 1024];
                for _ in 0..TOTAL / block.len() {
                    if conn.write_all(&block).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut cp = ControlPlane::start();
    let creds = cp.add_device("bench");
    // The harness's daemon config cannot take top-level keys: write one with exposed_ports.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("device.key");
    std::fs::copy(&creds.key_file, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let root = dir.path().join("project");
    std::fs::create_dir_all(&root).unwrap();
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "exposed_ports = [{up_port}]\ndata_dir = {data:?}\n[server]\nurl = {url:?}\n\
             [device]\nid = {id:?}\nkey_file = {key:?}\n[roots]\ncwd = {root:?}\n",
            data = dir.path().join("data").display().to_string(),
            url = cp.ws_url(),
            id = creds.id,
            key = key.display().to_string(),
            root = root.display().to_string(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let _daemon = Child(
        Command::new(bin_path("codemantle-daemon"))
            .arg("--config")
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    cp.wait_online(&creds.id);
    let path = format!("/devices/{}/port/{up_port}/blob", creds.id);
    for round in 0..2 {
        let started = std::time::Instant::now();
        let mut resp = smol::block_on(cp.client().open(Request::new("GET", &path))).unwrap();
        assert_eq!(resp.status, 200);
        let mut bytes = 0usize;
        while let Some(chunk) = smol::block_on(resp.read_chunk()).unwrap() {
            bytes += chunk.len();
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(bytes, TOTAL);
        println!(
            "port proxy end to end (round {round}): {} MiB in {secs:.2} s = {:.0} MB/s",
            bytes >> 20,
            bytes as f64 / secs / 1e6
        );
    }
}
