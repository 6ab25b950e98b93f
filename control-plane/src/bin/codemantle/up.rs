//! `codemantle up`: the one-command quick start.
//!
//! Starts a control plane on its embedded store and a daemon on this host connected to it over
//! loopback, with a fresh owner token and device, then prints what to try next. Everything it
//! makes lives in one directory (mode 0700, default `~/.local/state/codemantle/quickstart`), so a
//! second `up` reuses the same token, device and project, and removing the directory is a full
//! reset. It provisions through the same library calls as `codemantle-control-plane init` and
//! `device add`, and runs the real binaries (found next to this one), so what an operator sees
//! here is what a fleet runs.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use codemantle_control_plane::admin;
use codemantle_control_plane::client::{Client, Request};

/// Arguments of `codemantle up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Directory for the quick start's state: stores, token, device key, configs, project.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Loopback address for the control plane (tunnel and HTTP API).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8787")]
    listen: String,
    /// Project root the daemon serves as `cwd` (default: DIR/project, created with a sample file).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Provision, start, wait until the device is online, print the next steps, then stop
    /// (for scripts and tests).
    #[arg(long)]
    check: bool,
}

const DEVICE_NAME: &str = "quickstart";

struct Layout {
    dir: PathBuf,
    cp_data: PathBuf,
    daemon_data: PathBuf,
    daemon_config: PathBuf,
    device_key: PathBuf,
    device_id_file: PathBuf,
    token_file: PathBuf,
    root: PathBuf,
}

impl Layout {
    fn new(dir: PathBuf, root: Option<PathBuf>) -> Layout {
        Layout {
            cp_data: dir.join("control-plane-data"),
            daemon_data: dir.join("daemon-data"),
            daemon_config: dir.join("daemon.toml"),
            device_key: dir.join("device.key"),
            device_id_file: dir.join("device.id"),
            token_file: dir.join("owner.token"),
            root: root.unwrap_or_else(|| dir.join("project")),
            dir,
        }
    }
}

/// Runs `codemantle up`.
pub fn run(args: UpArgs) -> ExitCode {
    match up(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("codemantle up: {e}");
            ExitCode::from(1)
        }
    }
}

fn default_dir() -> Result<PathBuf, String> {
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(state).join("codemantle/quickstart"));
    }
    let home = std::env::var_os("HOME")
        .filter(|s| !s.is_empty())
        .ok_or("HOME is not set: pass --dir DIR")?;
    Ok(PathBuf::from(home).join(".local/state/codemantle/quickstart"))
}

fn up(args: UpArgs) -> Result<(), String> {
    let dir = match args.dir {
        Some(d) => d,
        None => default_dir()?,
    };
    let dir = absolute(&dir)?;
    let root = args.root.map(|r| absolute(&r)).transpose()?;
    let layout = Layout::new(dir, root);
    let addr: std::net::SocketAddr = args.listen.parse().map_err(|_| {
        format!(
            "--listen {}: expected IP:PORT, e.g. 127.0.0.1:8787",
            args.listen
        )
    })?;
    let (token, device_id) = provision(&layout, addr)?;

    let cp_bin = sibling("codemantle-control-plane")?;
    let daemon_bin = sibling("codemantle-daemon")?;
    let server = format!("http://{addr}");

    eprintln!(
        "starting the control plane on {server} (store: {})",
        layout.cp_data.display()
    );
    let mut cp = Supervised::spawn(
        "control plane",
        Command::new(&cp_bin)
            .arg("--data-dir")
            .arg(&layout.cp_data)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("serve"),
        &layout.dir.join("control-plane.log"),
    )?;
    let client = Client::new(&server, Some(token.clone()), None).map_err(|e| e.to_string())?;
    wait_for(
        "the control plane to answer /health",
        Duration::from_secs(20),
        &mut [&mut cp],
        || {
            smol::block_on(client.send(Request::new("GET", "/health")))
                .map(|r| r.status == 200)
                .unwrap_or(false)
        },
    )?;

    eprintln!(
        "starting the daemon for device {device_id} (project root: {})",
        layout.root.display()
    );
    let mut daemon = Supervised::spawn(
        "daemon",
        Command::new(&daemon_bin)
            .arg("--config")
            .arg(&layout.daemon_config),
        &layout.dir.join("daemon.log"),
    )?;
    let device_path = format!("/devices/{device_id}");
    wait_for(
        "the device to come online",
        Duration::from_secs(30),
        &mut [&mut cp, &mut daemon],
        || {
            smol::block_on(client.send(Request::new("GET", &device_path)))
                .map(|r| r.status == 200 && r.json()["device"]["status"] == "online")
                .unwrap_or(false)
        },
    )?;

    print_next_steps(&layout, &server, &device_id);
    if args.check {
        daemon.stop();
        cp.stop();
        return Ok(());
    }
    eprintln!(
        "\nrunning; press Ctrl-C to stop both (logs: {}/*.log)",
        layout.dir.display()
    );
    let stop = stop_signal()?;
    loop {
        if stop.try_recv().is_ok() {
            break;
        }
        let exited = [&mut cp, &mut daemon]
            .into_iter()
            .find_map(|s| s.exited().map(|status| (s.name, status, s.log.clone())));
        if let Some((name, status, log)) = exited {
            daemon.stop();
            cp.stop();
            return Err(format!(
                "the {name} exited ({status}); see {}",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("stopping");
    daemon.stop();
    cp.stop();
    Ok(())
}

/// First run: store, owner token, device and its key, daemon config, sample project. Later
/// runs reuse them (the daemon config is rewritten so `--listen` and `--root` can change).
fn provision(l: &Layout, addr: std::net::SocketAddr) -> Result<(String, String), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&l.dir)
        .map_err(|e| format!("cannot create {}: {e}", l.dir.display()))?;
    std::fs::set_permissions(&l.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot make {} private: {e}", l.dir.display()))?;

    let (token, device_id) = if l.token_file.exists() && l.device_id_file.exists() {
        let token = read_trimmed(&l.token_file)?;
        let id = read_trimmed(&l.device_id_file)?;
        eprintln!("reusing the quick start in {}", l.dir.display());
        (token, id)
    } else {
        let store = admin::open(&l.cp_data).map_err(|e| {
            format!(
                "{e} (is another `codemantle up` or control plane using {}?)",
                l.cp_data.display()
            )
        })?;
        let owner = admin::init(&store).map_err(|e| {
            format!("{e}; the quick start in {} is incomplete: remove that directory and run `codemantle up` again", l.dir.display())
        })?;
        let _ = std::fs::remove_file(&l.device_key);
        let device = admin::add_device(
            &store,
            "default",
            DEVICE_NAME,
            &["quickstart=true".to_owned()],
            None,
            Some(&l.device_key),
        )
        .map_err(|e| e.to_string())?;
        drop(store);
        write_private(&l.token_file, &owner.bearer)?;
        write_private(&l.device_id_file, &device.id)?;
        eprintln!(
            "created owner token and device {} in {}",
            device.id,
            l.dir.display()
        );
        (owner.bearer, device.id)
    };

    if !l.root.exists() {
        std::fs::create_dir_all(&l.root)
            .map_err(|e| format!("cannot create {}: {e}", l.root.display()))?;
        std::fs::write(
            l.root.join("README.md"),
            "This directory is the quick start's project root (`cwd`).\n",
        )
        .map_err(|e| format!("cannot write a sample file: {e}"))?;
        std::fs::create_dir_all(l.root.join("src")).map_err(|e| e.to_string())?;
    }
    let config = format!(
        "# Written by `codemantle up`; rewritten on every run.\n\
         data_dir = {data:?}\n\n\
         [server]\nurl = \"ws://{addr}/ws\"\n\n\
         [device]\nid = {id:?}\nkey_file = {key:?}\n\n\
         [roots]\ncwd = {root:?}\n",
        data = l.daemon_data.display().to_string(),
        id = device_id,
        key = l.device_key.display().to_string(),
        root = l.root.display().to_string(),
    );
    write_private(&l.daemon_config, &config)?;
    Ok((token, device_id))
}

fn print_next_steps(l: &Layout, server: &str, device_id: &str) {
    let token_file = l.token_file.display();
    println!(
        "\nCodeMantle is up: control plane {server}, device {device_id} online.\n\
         \n\
         Try next (the owner token is in {token_file}):\n\
         \n  export CODEMANTLE_SERVER={server}\
         \n  export CODEMANTLE_TOKEN=$(cat {token_file})\
         \n  codemantle devices list\
         \n  codemantle fs ls {device_id} .\
         \n  codemantle fs mkdir {device_id} scratch\
         \n  codemantle events\
         \n\
         \nor with curl:\
         \n  curl -s -H \"authorization: Bearer $CODEMANTLE_TOKEN\" {server}/devices\
         \n  curl -s -H \"authorization: Bearer $CODEMANTLE_TOKEN\" -H 'content-type: application/json' \\\
         \n       -d '{{\"path\":\".\"}}' {server}/devices/{device_id}/dir\
         \n\
         \nThe API is described at {server}/openapi.json."
    );
}

/// A child process whose output goes to a log file, stopped with SIGTERM then SIGKILL.
struct Supervised {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Supervised {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Supervised, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start the {name}: {e}"))?;
        Ok(Supervised {
            name,
            child,
            log: log.to_owned(),
        })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = nix_pid(self.child.id());
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

fn nix_pid(id: u32) -> libc::pid_t {
    libc::pid_t::try_from(id).unwrap_or(libc::pid_t::MAX)
}

fn wait_for(
    what: &str,
    limit: Duration,
    children: &mut [&mut Supervised],
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return Ok(());
        }
        for c in children.iter_mut() {
            if let Some(status) = c.exited() {
                return Err(format!(
                    "the {} exited ({status}) while waiting for {what}; its log says:\n{}",
                    c.name,
                    tail(&c.log, 20)
                ));
            }
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = children
                .iter()
                .map(|c| format!("--- {} ---\n{}", c.log.display(), tail(&c.log, 20)))
                .collect();
            return Err(format!(
                "timed out after {}s waiting for {what}\n{}",
                limit.as_secs(),
                logs.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// SIGINT/SIGTERM as a channel, polled by the supervision loop.
fn stop_signal() -> Result<std::sync::mpsc::Receiver<()>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    // SAFETY: a plain sigset; the signals are blocked in every thread (this runs before any
    // other thread is spawned) and taken synchronously by the waiting thread with sigwait.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err("cannot block SIGINT/SIGTERM".into());
        }
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig = 0;
                if libc::sigwait(&set, &mut sig) == 0 {
                    let _ = tx.send(());
                }
            })
            .map_err(|e| e.to_string())?;
    }
    Ok(rx)
}

fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found next to {}: build every binary first (`cargo build --release --workspace`)",
            name,
            exe.display()
        ))
    }
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn read_trimmed(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("cannot read {}: {e}", p.display()))
}

fn write_private(p: &Path, contents: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(p);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .map_err(|e| format!("cannot write {}: {e}", p.display()))
}
