//! Real processes on loopback: a control plane (`codemantle-control-plane serve`) on its own
//! sled directory and port, and daemons (`codemantle-daemon`) connected to it, each in a temp
//! directory that is removed when the test ends.
//!
//! Provisioning goes through the server's own admin subcommands (`init`, `device add
//! --out-key`), exactly as an operator does it, and every process is killed on drop so a failed
//! assertion never leaves a server behind.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use codemantle_control_plane::client::{Client, Request, Response};
use serde_json::Value;

use crate::bins::bin_path;

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A control plane process with its data dir, port and owner token.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub token: String,
    child: Option<Child>,
    options: CpOptions,
}

/// More settings for [`ControlPlane::start_with`]; the default is what
/// [`ControlPlane::start`] does.
#[derive(Debug, Clone, Default)]
pub struct CpOptions {
    /// A config file (TOML, e.g. a `[tunnel]` table) written next to the data dir and passed
    /// with `--config`.
    pub config: Option<String>,
    /// Environment of the server process (e.g. `CODEMANTLE_LOG`).
    pub env: Vec<(String, String)>,
    /// The data dir (default `<dir>/data`), e.g. a directory on a small tmpfs. Must not exist
    /// yet or be empty.
    pub data_dir: Option<PathBuf>,
    /// The address to listen on (default 127.0.0.1); the port is a free one as usual.
    pub listen_ip: Option<std::net::IpAddr>,
    /// The address clients dial (default: `listen_ip`), e.g. 127.0.0.1 when listening on
    /// 0.0.0.0 inside a test's own network namespace.
    pub connect_ip: Option<std::net::IpAddr>,
}

/// A registered device: its id and the path of its key file (0600).
#[derive(Debug, Clone)]
pub struct DeviceCredentials {
    pub id: String,
    pub key_file: PathBuf,
}

impl ControlPlane {
    /// Initialises a store (owner token) and starts the server on a free port.
    pub fn start() -> ControlPlane {
        ControlPlane::start_with(CpOptions::default())
    }

    /// [`ControlPlane::start`] with a config file, environment, data dir or listen address.
    pub fn start_with(options: CpOptions) -> ControlPlane {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = options
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let token = run_ok(
            Command::new(bin_path("codemantle-control-plane"))
                .arg("--data-dir")
                .arg(&data)
                .arg("init"),
        )
        .trim()
        .to_owned();
        assert!(token.starts_with("cmt_"), "init printed {token:?}");
        if let Some(config) = &options.config {
            std::fs::write(dir.path().join("control-plane.toml"), config).expect("write config");
        }
        let mut cp = ControlPlane {
            dir,
            port: free_port(),
            token,
            child: None,
            options,
        };
        cp.spawn();
        cp
    }

    /// The server's data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.options
            .data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// The listen address's IP.
    pub fn ip(&self) -> std::net::IpAddr {
        self.options
            .listen_ip
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    }

    /// The IP clients dial: `connect_ip`, else the listen address's.
    pub fn connect_ip(&self) -> std::net::IpAddr {
        self.options.connect_ip.unwrap_or_else(|| self.ip())
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("control-plane.log")
    }

    /// Registers a device while the server is stopped (local admin owns the store then).
    /// Stops and restarts the server around it if it is running.
    pub fn add_device(&mut self, name: &str) -> DeviceCredentials {
        self.add_device_with_labels(name, &[])
    }

    /// [`ControlPlane::add_device`] with labels (`device add --label k=v`), for fleet pushes
    /// by label selector.
    pub fn add_device_with_labels(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> DeviceCredentials {
        let was_running = self.child.is_some();
        if was_running {
            self.stop();
        }
        let key_file = self.dir.path().join(format!("{name}.key"));
        let mut cmd = Command::new(bin_path("codemantle-control-plane"));
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .args(["device", "add", name, "--out-key"])
            .arg(&key_file);
        for (k, v) in labels {
            cmd.arg("--label").arg(format!("{k}={v}"));
        }
        let out = run_ok(&mut cmd);
        let id = out
            .lines()
            .find_map(|l| l.strip_prefix("device id:"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| panic!("no device id in {out:?}"));
        if was_running {
            self.spawn();
        }
        DeviceCredentials { id, key_file }
    }

    /// Starts the server (again) on the same port and data dir and waits for `/health`.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "control plane already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(bin_path("codemantle-control-plane"));
        if self.options.config.is_some() {
            cmd.arg("--config")
                .arg(self.dir.path().join("control-plane.toml"));
        }
        cmd.envs(self.options.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(std::net::SocketAddr::new(self.ip(), self.port).to_string())
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start codemantle-control-plane");
        self.child = Some(child);
        let client = self.client();
        wait_until(Duration::from_secs(20), "control plane /health", || {
            smol::block_on(client.send(Request::new("GET", "/health")))
                .map(|r| r.status == 200)
                .unwrap_or(false)
        });
    }

    /// SIGKILL: no clean shutdown, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    pub fn url(&self) -> String {
        format!(
            "http://{}",
            std::net::SocketAddr::new(self.connect_ip(), self.port)
        )
    }

    pub fn ws_url(&self) -> String {
        format!(
            "ws://{}/ws",
            std::net::SocketAddr::new(self.connect_ip(), self.port)
        )
    }

    pub fn client(&self) -> Client {
        let mut c = Client::new(&self.url(), Some(self.token.clone()), None).expect("client");
        c.timeout = Duration::from_secs(30);
        c
    }

    /// `GET path` → (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self.send(Request::new("GET", path));
        (r.status, r.json())
    }

    /// `POST path` with a JSON body → (status, JSON body).
    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.send(Request::new("POST", path).json(&body));
        (r.status, r.json())
    }

    pub fn send(&self, req: Request) -> Response {
        smol::block_on(self.client().send(req)).expect("HTTP exchange with the control plane")
    }

    /// Waits until the API reports the device online.
    pub fn wait_online(&self, device: &str) {
        let path = format!("/devices/{device}");
        wait_until(Duration::from_secs(30), "device online", || {
            let (status, body) = self.get(&path);
            status == 200 && body["device"]["status"] == "online"
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Every event of the owner's tenant with a sequence number above `after`, in order
    /// (paged through `GET /events`).
    pub fn events_after(&self, after: u64) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        let mut after = after;
        loop {
            let (status, body) = self.get(&format!("/events?after={after}&limit=1000"));
            assert_eq!(status, 200, "{body}");
            let page = body["events"].as_array().cloned().unwrap_or_default();
            let Some(last) = page.last().and_then(|e| e["seq"].as_u64()) else {
                return out;
            };
            after = last;
            out.extend(page);
        }
    }
}

/// Asserts that `events` carry the sequence numbers `first, first+1, ...` with no gap or repeat.
pub fn assert_gap_free(events: &[Value], first: u64) {
    for (i, e) in events.iter().enumerate() {
        let expected = first + i as u64;
        assert_eq!(
            e["seq"].as_u64(),
            Some(expected),
            "event #{i} should have seq {expected}: {e}"
        );
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A daemon process with its config, data dir and project root.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Writes a config for `device` against `ws_url` with a fresh project root, and starts it.
    pub fn start(ws_url: &str, device: &DeviceCredentials) -> Daemon {
        Daemon::start_with(ws_url, device, |_| String::new())
    }

    /// [`Daemon::start`] with more configuration: `extra(dir)` gets the daemon's temp dir
    /// (the project root is `dir/project`, already created) before the daemon starts, may
    /// prepare files there (a private dir, ownership for `process.run_as`), and returns TOML
    /// appended to the config. Write only whole sections (`[process]`, `[git]`,
    /// `[config_push]`): the generated config ends inside `[reconnect]`.
    pub fn start_with(
        ws_url: &str,
        device: &DeviceCredentials,
        extra: impl FnOnce(&Path) -> String,
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("project");
        std::fs::create_dir_all(&root).expect("project root");
        let key = dir.path().join("device.key");
        std::fs::copy(&device.key_file, &key).expect("copy key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let config = dir.path().join("daemon.toml");
        let extra = extra(dir.path());
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\n[server]\nurl = {ws_url:?}\n[device]\nid = {id:?}\n\
                 key_file = {key:?}\n[roots]\ncwd = {root:?}\n\
                 [reconnect]\nbase_ms = 200\ncap_ms = 2000\n{extra}\n",
                data = dir.path().join("data").display().to_string(),
                id = device.id,
                key = key.display().to_string(),
                root = root.display().to_string(),
            ),
        )
        .expect("write config");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut d = Daemon {
            dir,
            root,
            config,
            child: None,
        };
        d.spawn();
        d
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let child = Command::new(bin_path("codemantle-daemon"))
            .arg("--config")
            .arg(&self.config)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start codemantle-daemon");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn terminate(c: &mut Child) {
    if let Ok(pid) = libc_pid(c.id()) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn libc_pid(id: u32) -> Result<libc::pid_t, std::num::TryFromIntError> {
    libc::pid_t::try_from(id)
}

/// Polls `ok` every 50 ms until it holds, or panics naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Files and directories directly in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
