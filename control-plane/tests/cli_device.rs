//! The `codemantle` CLI's device commands (`fs`, `sessions`) against the real server binary,
//! with a simulated daemon serving an in-memory tree.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use codemantle_tests::simdaemon::{SimConfig, SimDaemon};
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
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cli<'a> {
    home: &'a Path,
    url: &'a str,
    token: &'a str,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(CLI)
            .args(args)
            .env("HOME", self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("CODEMANTLE_SERVER", self.url)
            .env("CODEMANTLE_TOKEN", self.token)
            .env_remove("CODEMANTLE_CA_CERT")
            .output()
            .expect("run codemantle")
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "codemantle {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[test]
fn fs_and_sessions_commands_drive_a_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let token = String::from_utf8(admin(&data, &["init"]).stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let key_file = dir.path().join("device.key");
    let id = "dev_clidevice00001";
    admin(
        &data,
        &[
            "device",
            "add",
            "cli-box",
            "--id",
            id,
            "--out-key",
            key_file.to_str().expect("utf8 path"),
        ],
    );
    let secret = std::fs::read_to_string(&key_file)
        .expect("key")
        .trim()
        .to_owned();
    let server = RunningServer::start(&data);
    let addr: SocketAddr = server
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let mut config = SimConfig::new(addr, id, &secret);
    config.log =
        std::sync::Arc::from("{\"k\":\"log\",\"src\":\"opencode\",\"m\":\"ready\"}\nplain line");
    {
        let mut tree = config.tree.lock().expect("tree");
        tree.add_file("src/main.rs", 2048);
        tree.add_dir("docs");
    }
    let tree = config.tree.clone();
    let sim = smol::block_on(SimDaemon::connect(config))
        .expect("connect")
        .accepted();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let cli = Cli {
        home: &home,
        url: &server.url,
        token: &token,
    };
    let start = Instant::now();
    while !cli.ok(&["devices", "list"]).contains("online") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "device never online"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let ls = cli.ok(&["fs", "ls", id]);
    assert!(ls.starts_with("TYPE"), "{ls}");
    assert!(ls.contains("docs/") && ls.contains("src/"), "{ls}");
    let ls = cli.ok(&["fs", "ls", id, "src"]);
    assert!(ls.contains("main.rs") && ls.contains("2.0K"), "{ls}");
    let json: Value =
        serde_json::from_str(&cli.ok(&["--json", "fs", "ls", id, "src"])).expect("json");
    assert_eq!(json["t"], "ds");

    assert_eq!(
        cli.ok(&["fs", "mkdir", id, "build/out"]).trim(),
        "created build/out"
    );
    assert!(tree.lock().expect("tree").is_dir("build/out"));
    cli.ok(&["fs", "mv", id, "build/out", "build/final"]);
    assert!(tree.lock().expect("tree").is_dir("build/final"));
    let out = cli.run(&["fs", "rmdir", id, "build"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a non-empty directory is refused"
    );
    cli.ok(&["fs", "rmdir", id, "build", "--recursive"]);
    assert!(!tree.lock().expect("tree").exists("build"));
    let out = cli.run(&["fs", "ls", id, "../etc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("path_invalid"));
    let out = cli.run(&["fs", "ls", "dev_nosuchdevice001"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("device_not_found"));

    let started = cli.ok(&[
        "sessions",
        "start",
        id,
        "--path",
        "proj",
        "--session-id",
        "ses_cli",
    ]);
    assert!(started.contains("session ses_cli started"), "{started}");
    let again = cli.ok(&["sessions", "start", id, "--path", "proj"]);
    assert!(again.contains("reused"), "{again}");
    let status = cli.ok(&["sessions", "status", id, "--path", "proj"]);
    assert!(
        status.contains("running: yes") && status.contains("ses_cli"),
        "{status}"
    );
    // The simulated daemon streams no output, so the stored stream is empty: the session's
    // log on the device (`sl` snapshot) is what `--device-log` shows.
    let out = cli.run(&["sessions", "logs", "ses_cli"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stream_not_found"));
    let logs = cli.ok(&[
        "sessions",
        "logs",
        "ses_cli",
        "--device-log",
        "--tail",
        "10",
    ]);
    assert!(
        logs.contains("[opencode] ready") && logs.contains("plain line"),
        "{logs}"
    );
    let sent = cli.ok(&["sessions", "prompt", id, "ses_cli", "build", "it"]);
    assert!(sent.contains("sent to ses_cli"), "{sent}");
    assert_eq!(sim.count("sp"), 1);
    let stopped = cli.ok(&["sessions", "stop", id]);
    assert!(stopped.contains("session ses_cli stopped"), "{stopped}");
    let status = cli.ok(&["sessions", "status", id, "--path", "proj"]);
    assert!(status.contains("running: no"), "{status}");
}
