//! The real binaries: `codemantle-control-plane` (local admin + `serve`) and the `codemantle`
//! CLI talking to it over HTTP on 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const SERVER: &str = env!("CARGO_BIN_EXE_codemantle-control-plane");
const CLI: &str = env!("CARGO_BIN_EXE_codemantle");

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
        // Keep draining stderr so the server never blocks on a full pipe.
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

    /// SIGTERM, then wait: the server must exit 0.
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

fn cli(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(CLI);
    cmd.args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env_remove("CODEMANTLE_SERVER")
        .env_remove("CODEMANTLE_TOKEN")
        .env_remove("CODEMANTLE_CA_CERT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run codemantle")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "codemantle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_lists_devices_as_a_table_and_as_json_against_a_real_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data: PathBuf = dir.path().join("data");
    let token = String::from_utf8(admin(&data, &["init"]).stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    assert!(token.starts_with("cmt_"));
    let key_file = dir.path().join("device.key");
    admin(
        &data,
        &[
            "device",
            "add",
            "build box",
            "--label",
            "rack=r1",
            "--out-key",
            key_file.to_str().expect("path"),
        ],
    );
    admin(
        &data,
        &["device", "add", "gpu", "--id", "dev_gpu_box_00001"],
    );
    let server = RunningServer::start(&data);
    let home = dir.path();
    let env = [
        ("CODEMANTLE_SERVER", server.url.as_str()),
        ("CODEMANTLE_TOKEN", token.as_str()),
    ];

    let table = stdout(&cli(home, &env, &["devices", "list"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "header + 2 devices:\n{table}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("NAME") && lines[0].contains("STATUS"));
    let status_col = lines[0].find("STATUS").expect("STATUS column");
    for row in &lines[1..] {
        assert_eq!(
            row.get(status_col..status_col + 10),
            Some("never-seen"),
            "aligned:\n{table}"
        );
    }
    assert!(
        table.contains("dev_gpu_box_00001")
            && table.contains("build box")
            && table.contains("rack=r1")
    );

    let json: Value =
        serde_json::from_str(&stdout(&cli(home, &env, &["--json", "devices", "list"])))
            .expect("json");
    let devices = json["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 2);
    assert!(
        devices
            .iter()
            .all(|d| d["status"] == "never-seen" && d.get("secret").is_none())
    );

    // Add through the API, see it in `show`, and follow the event stream.
    let mut follower = Command::new(CLI)
        .args(["--json", "events", "-f", "--limit", "1"])
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("CODEMANTLE_SERVER", &server.url)
        .env("CODEMANTLE_TOKEN", &token)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn follower");
    let (tx, rx) = mpsc::channel();
    let follower_out = follower.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(follower_out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first: Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(20)).expect("tail line"))
            .expect("json");
    assert_eq!(first["kind"], "device.added");
    std::thread::sleep(Duration::from_millis(300)); // let the stream connect; it replays anyway

    let added = stdout(&cli(
        home,
        &env,
        &["devices", "add", "third", "--id", "dev_third_box_001"],
    ));
    assert!(added.contains("dev_third_box_001") && added.contains("secret:"));
    let live: Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(20)).expect("live line"))
            .expect("json");
    assert_eq!(
        (live["kind"].as_str(), live["detail"]["device"].as_str()),
        (Some("device.added"), Some("dev_third_box_001"))
    );
    assert_eq!(live["seq"].as_u64(), first["seq"].as_u64().map(|s| s + 1));
    let _ = follower.kill();
    let _ = follower.wait();

    let shown = stdout(&cli(home, &env, &["devices", "show", "dev_third_box_001"]));
    assert!(shown.contains("name:") && shown.contains("third"));
    let tokens = stdout(&cli(home, &env, &["tokens", "list"]));
    assert!(tokens.contains("initial owner") && tokens.contains("owner"));

    // cli.toml works instead of env.
    let cfg_dir = home.join(".config/codemantle");
    std::fs::create_dir_all(&cfg_dir).expect("mkdir");
    std::fs::write(
        cfg_dir.join("cli.toml"),
        format!("server = \"{}\"\ntoken = \"{token}\"\n", server.url),
    )
    .expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        cfg_dir.join("cli.toml"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    assert!(stdout(&cli(home, &[], &["devices", "list"])).contains("dev_third_box_001"));

    // API errors: a message, the code, exit status 1.
    let bad = cli(
        home,
        &[("CODEMANTLE_TOKEN", "cmt_0123456789abcdef_wrong")],
        &["devices", "list"],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid_token"));
    let missing = cli(home, &env, &["devices", "show", "dev_not_there_0001"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("device_not_found"));

    // Clean shutdown, and what the API wrote is in the data dir.
    server.stop();
    let listed = String::from_utf8(admin(&data, &["device", "list"]).stdout).expect("utf8");
    assert!(listed.contains("dev_third_box_001"));
    // The key file holds the secret, mode 0600.
    let mode = std::fs::metadata(&key_file)
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn unreachable_server_is_reported_with_a_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = cli(
        dir.path(),
        &[
            ("CODEMANTLE_SERVER", "http://127.0.0.1:1"),
            ("CODEMANTLE_TOKEN", "x"),
        ],
        &["devices", "list"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the control plane running"));
}

#[test]
fn local_admin_refuses_a_data_dir_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    admin(&data, &["init"]);
    let server = RunningServer::start(&data);
    let out = Command::new(SERVER)
        .arg("--data-dir")
        .arg(&data)
        .args(["token", "create", "--role", "viewer", "--name", "x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another process"));
    server.stop();
}
