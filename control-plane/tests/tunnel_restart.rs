//! A restart of the real server binary: devices, tokens, templates and the event log survive,
//! the event sequence resumes without a gap, and a daemon reconnects and is served again.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use codemantle_control_plane::client::{Client, Request, Response};
use codemantle_tests::simdaemon::{SimConfig, SimDaemon};
use serde_json::{Value, json};

const SERVER: &str = env!("CARGO_BIN_EXE_codemantle-control-plane");

fn admin(data: &Path, args: &[&str]) -> Output {
    let out = Command::new(SERVER)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("CODEMANTLE_CONFIG")
        .output()
        .expect("run admin command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct RunningServer {
    child: Child,
    url: String,
}

impl RunningServer {
    fn start(data: &Path) -> RunningServer {
        let mut child = Command::new(SERVER)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "serve"])
            .env_remove("CODEMANTLE_CONFIG")
            .env("CODEMANTLE_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on ") {
                    let url = line[i + "listening on ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    let _ = tx.send(url);
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server did not report its address");
        RunningServer { child, url }
    }

    fn addr(&self) -> SocketAddr {
        self.url
            .trim_start_matches("http://")
            .parse()
            .expect("socket address")
    }

    fn stop(mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "server exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("server did not stop within 10 s of SIGTERM");
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(client: &Client, req: Request) -> Response {
    smol::block_on(client.send(req)).expect("request")
}

fn events(client: &Client) -> Vec<Value> {
    let r = send(client, Request::new("GET", "/events?after=0&limit=1000"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["events"].as_array().cloned().unwrap_or_default()
}

fn assert_contiguous(events: &[Value]) {
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs.first(), Some(&1), "{seqs:?}");
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "gap in the event log: {seqs:?}");
    }
}

fn wait_online(client: &Client, id: &str) {
    let start = Instant::now();
    loop {
        let d = send(client, Request::new("GET", &format!("/devices/{id}"))).json();
        if d["device"]["status"] == "online" {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{id} never online: {d}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn state_survives_a_restart_and_the_event_log_resumes_without_a_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let owner = String::from_utf8(admin(&data, &["init"]).stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let key_file = dir.path().join("device.key");
    let id = "dev_restart0000001";
    admin(
        &data,
        &[
            "device",
            "add",
            "restart-box",
            "--id",
            id,
            "--out-key",
            key_file.to_str().expect("utf8 path"),
        ],
    );
    let secret = std::fs::read_to_string(&key_file)
        .expect("key file")
        .trim()
        .to_owned();

    let server = RunningServer::start(&data);
    let client = Client::new(&server.url, Some(owner.clone()), None).expect("client");
    let sim = smol::block_on(SimDaemon::connect(SimConfig::new(
        server.addr(),
        id,
        &secret,
    )))
    .expect("connect")
    .accepted();
    wait_online(&client, id);
    let dir_call = |client: &Client| {
        send(
            client,
            Request::new("POST", &format!("/devices/{id}/dir")).json(&json!({})),
        )
    };
    assert_eq!(dir_call(&client).status, 200);
    let template = json!({
        "schemaVersion": "1.0.0",
        "templateId": "build-box",
        "templateVersion": "1.2.0",
        "routing": { "defaultModel": "anthropic/claude-sonnet-4", "intents": [] },
        "mcpRefs": []
    });
    let r = send(
        &client,
        Request::new("POST", "/config/templates").json(&json!({ "template": template })),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        &client,
        Request::new("POST", "/tokens").json(&json!({"name": "ci", "role": "viewer"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let viewer = r.json()["secret"].as_str().expect("secret").to_owned();
    let before = events(&client);
    assert_contiguous(&before);
    assert!(before.iter().any(|e| e["kind"] == "command"));

    server.stop();
    assert!(smol::block_on(sim.closed_within(Duration::from_secs(5))));
    assert_eq!(sim.close_frame().map(|c| c.0), Some(1001));

    let server = RunningServer::start(&data);
    let client = Client::new(&server.url, Some(owner), None).expect("client");
    let d = send(&client, Request::new("GET", &format!("/devices/{id}"))).json();
    assert_eq!(d["device"]["status"], "offline", "{d}");
    assert!(d["device"]["last_seen_ms"].is_u64());
    let viewer_client = Client::new(&server.url, Some(viewer), None).expect("client");
    let r = send(&viewer_client, Request::new("GET", "/config/templates"));
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.json()["templates"].clone();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["templateId"], template["templateId"]);
    assert_eq!(listed[0]["templateVersion"], template["templateVersion"]);

    let after = events(&client);
    assert_contiguous(&after);
    assert_eq!(
        after[..before.len()],
        before[..],
        "events before the restart changed"
    );

    let sim = smol::block_on(SimDaemon::connect(SimConfig::new(
        server.addr(),
        id,
        &secret,
    )))
    .expect("connect")
    .accepted();
    wait_online(&client, id);
    assert_eq!(dir_call(&client).status, 200);
    assert_eq!(sim.count("dr"), 1);
    let resumed = events(&client);
    assert_contiguous(&resumed);
    assert!(
        resumed.len() > after.len() + 1,
        "no new events after the restart"
    );
    server.stop();
}
