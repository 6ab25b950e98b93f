//! `cm-loadgen`: fleet-scale figures of a real control plane process over loopback.
//!
//! ```text
//! cargo run --release -p codemantle-tests --bin cm-loadgen -- --devices 10000 --rate 1000 --seconds 30
//! ```
//!
//! (Under `cargo run` it first builds `codemantle-control-plane` in the same profile; elsewhere
//! pass `--server PATH`.) What one run does:
//! 1. provisions `--devices` + `--warmup-devices` devices and an owner token straight into a
//!    fresh data dir with the library (`admin::init`, `registry::create_device`), server stopped;
//! 2. starts `codemantle-control-plane serve` on 127.0.0.1:0 with `tunnel.heartbeat_secs` =
//!    `--heartbeat` (default 5, the minimum, so pings run often), its log on a file;
//! 3. connects the warm-up devices, waits, reads VmRSS (`before`);
//! 4. **connect storm**: opens `--devices` simulated daemons (`codemantle_tests::simdaemon`: real
//!    WebSocket, real `h1`/`h2`, CBOR, one `p` each) with at most `--concurrency` handshakes in
//!    flight → handshakes/s = devices / (first connect → last verified `h2`);
//! 5. waits for steady state (at least one heartbeat round, VmRSS stable), reads VmRSS
//!    (`after`) → RSS per device = (after − before) / devices;
//! 6. **dr latency**: open loop at `--rate` req/s for `--seconds` s (after `--warmup-secs`
//!    unrecorded), `POST /devices/:id/dir` with the owner's bearer token over `--http-conns`
//!    keep-alive HTTP/1.1 connections, device picked at random per request; latency runs from
//!    the request's *scheduled* send time to the end of its response (no coordinated
//!    omission: a request delayed by a slow predecessor counts its wait);
//! 7. checks every device is still connected (heartbeats answered throughout).
//!
//! Besides the goals the table shows the server's CPU time per handshake (and the handshake
//! rate that implies for the server alone on this machine's CPUs: the storm's rate is bounded
//! by the server *and* this generator sharing the CPUs, and most of both is the kernel's
//! loopback TCP) and per `dr` request. Each run also prints the share of the CPUs that other
//! processes used meanwhile (from `/proc/stat`, minus the server's and the generator's own CPU
//! time); when it is noticeable the table ends with a note, since every throughput and latency
//! figure then is pessimistic.
//!
//! `--runs K` repeats 2–7 with a fresh server and data dir each time and prints the best-of and
//! the spread. Flags: `--devices N` `--rate R` `--seconds S` `--runs K` `--concurrency C`
//! `--heartbeat H` `--http-conns M` `--warmup-devices W` `--warmup-secs T` `--server PATH`
//! `--cp-log FILTER` (the server's `CODEMANTLE_LOG`; default its own default, `info`)
//! `--cp-env K=V` (more environment for the server, repeatable; e.g. `SMOL_THREADS=1`)
//! `--gen-threads T` (executor threads of this generator; default: all CPUs) `--keep`
//! (keep the temp dir with the server logs) `--perf storm|dr|storm-gen` (record that phase of
//! the server, or the storm in this generator, with `perf record --call-graph dwarf` into the
//! temp dir; implies `--keep`) `--slow-ms MS` (list the requests slower than MS, by scheduled
//! time, each with how late this generator sent it, and print the server's own
//! command-duration histogram).
//!
//! Both processes raise `RLIMIT_NOFILE` to the hard limit (a fleet of N needs N + a few
//! descriptors on each side).

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use codemantle_control_plane::registry::{self, NewDevice};
use codemantle_control_plane::store::{Store as _, TenantId};
use codemantle_tests::simdaemon::{self, Handshake, SimConfig, SimDaemon, Tree, Ws};
use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
use smol::net::TcpStream;

const USAGE: &str = "usage: cm-loadgen [--devices N] [--rate R] [--seconds S] [--runs K] \
[--concurrency C] [--heartbeat H] [--http-conns M] [--warmup-devices W] [--warmup-secs T] \
[--server PATH] [--cp-log FILTER] [--cp-env K=V]... [--gen-threads T] [--keep] \
[--perf storm|dr|storm-gen] [--slow-ms MS]";

#[derive(Debug, Clone)]
struct Args {
    devices: usize,
    rate: u64,
    seconds: u64,
    runs: usize,
    concurrency: usize,
    heartbeat: u32,
    http_conns: usize,
    warmup_devices: usize,
    warmup_secs: u64,
    server: Option<PathBuf>,
    cp_log: Option<String>,
    gen_threads: Option<usize>,
    keep: bool,
    /// `storm` or `dr`: record that phase of the server with `perf record --call-graph dwarf`.
    perf: Option<String>,
    /// Extra environment of the server (`--cp-env K=V`, repeatable).
    cp_env: Vec<(String, String)>,
    /// Print the requests slower than this (scheduled time and latency).
    slow_ms: Option<u64>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut a = Args {
            devices: 10_000,
            rate: 1000,
            seconds: 30,
            runs: 1,
            concurrency: 512,
            heartbeat: 5,
            http_conns: 32,
            warmup_devices: 200,
            warmup_secs: 2,
            server: None,
            cp_log: None,
            gen_threads: None,
            keep: false,
            perf: None,
            cp_env: Vec::new(),
            slow_ms: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--keep" {
                a.keep = true;
                continue;
            }
            if flag == "-h" || flag == "--help" {
                return Err(USAGE.into());
            }
            let value = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
            let num = |v: &str| -> Result<u64, String> {
                v.replace('_', "")
                    .parse()
                    .map_err(|_| format!("{flag}: {v:?} is not a number"))
            };
            match flag.as_str() {
                "--devices" => a.devices = num(&value)? as usize,
                "--rate" => a.rate = num(&value)?,
                "--seconds" => a.seconds = num(&value)?,
                "--runs" => a.runs = num(&value)?.max(1) as usize,
                "--concurrency" => a.concurrency = num(&value)?.max(1) as usize,
                "--heartbeat" => a.heartbeat = num(&value)? as u32,
                "--http-conns" => a.http_conns = num(&value)?.max(1) as usize,
                "--warmup-devices" => a.warmup_devices = num(&value)? as usize,
                "--warmup-secs" => a.warmup_secs = num(&value)?,
                "--server" => a.server = Some(PathBuf::from(value)),
                "--cp-log" => a.cp_log = Some(value),
                "--perf" => a.perf = Some(value),
                "--slow-ms" => a.slow_ms = Some(num(&value)?),
                "--cp-env" => {
                    let (k, v) = value
                        .split_once('=')
                        .ok_or_else(|| format!("--cp-env wants K=V, got {value:?}"))?;
                    a.cp_env.push((k.to_owned(), v.to_owned()));
                }
                "--gen-threads" => a.gen_threads = Some(num(&value)?.max(1) as usize),
                _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
            }
        }
        if a.devices == 0 {
            return Err("--devices must be at least 1".into());
        }
        Ok(a)
    }
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let threads = args.gen_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { std::env::set_var("SMOL_THREADS", threads.to_string()) };
    let nofile = raise_nofile();
    match run_all(&args, nofile) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cm-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises `RLIMIT_NOFILE` to its hard limit; returns the new soft limit.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    #[allow(clippy::unnecessary_cast, reason = "rlim_t is u32 on 32-bit targets")]
    let n = lim.rlim_cur as u64;
    n
}

// ---------------------------------------------------------------------------------------------
// Setup

/// Finds (and under `cargo run`, builds) the server binary of this profile.
fn server_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.server {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no exe dir"))?
        .to_path_buf();
    let path = dir.join("codemantle-control-plane");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(p) => p.to_owned(),
        };
        eprintln!("cm-loadgen: building codemantle-control-plane (profile {profile})");
        let status = Command::new(cargo)
            .args([
                "build",
                "--profile",
                &profile,
                "-p",
                "codemantle-control-plane",
            ])
            .args(["--bin", "codemantle-control-plane", "--locked"])
            .status()?;
        anyhow::ensure!(status.success(), "building the control plane failed");
    }
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build it (cargo build --release -p codemantle-control-plane) or pass \
         --server PATH",
        path.display()
    );
    Ok(path)
}

struct Fleet {
    /// (device id, secret), the warm-up devices first.
    devices: Vec<(String, String)>,
    bearer: String,
}

fn device_id(i: usize) -> String {
    format!("dev_load{i:08}")
}

/// Creates the data dir with the owner token and every device (server stopped).
fn provision(data: &Path, count: usize) -> anyhow::Result<Fleet> {
    let store = codemantle_control_plane::admin::open(data)?;
    let owner = codemantle_control_plane::admin::init(&store)?;
    let store = Arc::new(store);
    let tenant = TenantId::default_tenant();
    // Each registration is flushed (durable); a few writers let sled group the flushes.
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<(String, String)>>> = Mutex::new(vec![None; count]);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let new = NewDevice {
                        name: format!("load-{i}"),
                        labels: Default::default(),
                        id: Some(device_id(i)),
                    };
                    let (d, _) = registry::create_device(store.as_ref(), &tenant, new, "loadgen")
                        .expect("create device");
                    out.lock().expect("lock")[i] = Some((d.id, d.secret));
                }
            });
        }
    });
    store.flush()?;
    let devices = out
        .into_inner()
        .expect("lock")
        .into_iter()
        .map(|d| d.expect("every device"))
        .collect();
    Ok(Fleet {
        devices,
        bearer: owner.bearer,
    })
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The server process; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &Path, data: &Path, log: &Path, args: &Args) -> anyhow::Result<Server> {
    let mut cmd = Command::new(bin);
    cmd.arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "serve"])
        .env_remove("CODEMANTLE_CONFIG")
        // Ours (set for this generator), not the server's: it picks its own.
        .env_remove("SMOL_THREADS")
        .env("CODEMANTLE_HEARTBEAT_SECS", args.heartbeat.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(filter) = &args.cp_log {
        cmd.env("CODEMANTLE_LOG", filter);
    }
    for (k, v) in &args.cp_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let stderr = child.stderr.take().expect("piped stderr");
    let mut file = std::io::BufWriter::new(std::fs::File::create(log)?);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening on http://") {
                let rest = &line[i + "listening on http://".len()..];
                if let Some(tx) = tx.take() {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
            let _ = writeln!(file, "{line}");
        }
        let _ = file.flush();
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
        anyhow::anyhow!(
            "the server did not report its address; see {}",
            log.display()
        )
    })?;
    Ok(Server {
        child,
        addr: addr.parse()?,
    })
}

/// `perf record --call-graph dwarf` attached to the server for one phase; stopped (SIGINT) on drop.
struct Perf(Option<Child>);

impl Perf {
    fn start(args: &Args, phase: &str, pid: u32, out: &Path) -> Perf {
        if args.perf.as_deref() != Some(phase) {
            return Perf(None);
        }
        let child = Command::new("perf")
            .args(["record", "-F", "999", "--call-graph", "dwarf,16384"])
            .args(["-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(c) => {
                std::thread::sleep(Duration::from_millis(300));
                Perf(Some(c))
            }
            Err(e) => {
                eprintln!("cm-loadgen: cannot run perf: {e}");
                Perf(None)
            }
        }
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// User + system CPU time of a process.
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime, stime are fields 14 and 15 (1-based); `rest` starts at field 3.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// Waits until VmRSS stops moving (two samples 1 s apart within 64 KiB), at least `min`.
fn steady_rss(pid: u32, min: Duration) -> u64 {
    let start = Instant::now();
    std::thread::sleep(min);
    let mut last = rss_kib(pid);
    while start.elapsed() < min + Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(1));
        let now = rss_kib(pid);
        if now.abs_diff(last) <= 64 {
            return now;
        }
        last = now;
    }
    last
}

// ---------------------------------------------------------------------------------------------
// Connect storm

struct Storm {
    daemons: Vec<SimDaemon>,
    refused: usize,
    failed: usize,
    took: Duration,
}

fn sim_tree() -> Arc<Mutex<Tree>> {
    let mut t = Tree::default();
    for d in ["src", "docs", "tests", ".git"] {
        t.add_dir(d);
    }
    for (f, size) in [
        ("README.md", 2_345),
        ("Cargo.toml", 812),
        ("Cargo.lock", 48_113),
        ("LICENSE", 11_357),
        ("src/main.rs", 9_001),
        ("src/lib.rs", 4_096),
        (".gitignore", 24),
    ] {
        t.add_file(f, size);
    }
    Arc::new(Mutex::new(t))
}

/// Connects `devices` with at most `concurrency` handshakes in flight.
async fn storm(
    addr: SocketAddr,
    devices: &[(String, String)],
    concurrency: usize,
    tree: &Arc<Mutex<Tree>>,
) -> Storm {
    let next = Arc::new(AtomicUsize::new(0));
    let devices: Arc<Vec<(String, String)>> = Arc::new(devices.to_vec());
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.min(devices.len()))
        .map(|_| {
            let (next, devices, tree) = (next.clone(), devices.clone(), tree.clone());
            smol::spawn(async move {
                let mut ok = Vec::new();
                let (mut refused, mut failed) = (0, 0);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((id, secret)) = devices.get(i) else {
                        break;
                    };
                    let mut config = SimConfig::new(addr, id, secret);
                    config.tree = tree.clone();
                    let connected = match upgrade(addr).await {
                        Ok(ws) => SimDaemon::connect_over(config, ws).await,
                        Err(e) => Err(e),
                    };
                    match connected {
                        Ok(Handshake::Accepted(d)) => ok.push(d),
                        Ok(Handshake::Refused(r)) => {
                            if refused == 0 {
                                eprintln!("cm-loadgen: {id} refused: {r:?}");
                            }
                            refused += 1;
                        }
                        Err(e) => {
                            if failed == 0 {
                                eprintln!("cm-loadgen: {id} failed: {e}");
                            }
                            failed += 1;
                        }
                    }
                }
                (ok, refused, failed)
            })
        })
        .collect();
    let mut out = Storm {
        daemons: Vec::with_capacity(devices.len()),
        refused: 0,
        failed: 0,
        took: Duration::ZERO,
    };
    for w in workers {
        let (ok, refused, failed) = w.await;
        out.daemons.extend(ok);
        out.refused += refused;
        out.failed += failed;
    }
    out.took = started.elapsed();
    out
}

/// The WebSocket upgrade of a daemon, without tungstenite's client handshake (which builds an
/// `http::Request`, parses a full `http::Response` and cost this generator a quarter of its CPU
/// in a connect storm: the generator shares the machine with the server it measures). The same
/// bytes on the wire as a real daemon's; the `101` is checked (status and accept key).
async fn upgrade(addr: SocketAddr) -> std::io::Result<Ws> {
    use async_tungstenite::WebSocketStream;
    use async_tungstenite::tungstenite::handshake::derive_accept_key;
    use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    // 16 random bytes, base64: 21 free characters, one from the 2-bit-aligned set, `==`.
    let mut key = simdaemon::random_id(21).replace('-', "+").replace('_', "/");
    let pick = simdaemon::random_id(1).as_bytes()[0] % 4;
    key.push(['A', 'Q', 'g', 'w'][usize::from(pick)]);
    key.push_str("==");
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    let end = loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&head, b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > 8192 {
            return Err(std::io::Error::other("upgrade response too long"));
        }
    };
    let text = String::from_utf8_lossy(&head[..end]);
    let accept = derive_accept_key(key.as_bytes());
    let accepted = text.starts_with("HTTP/1.1 101 ")
        && text.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept
            })
        });
    if !accepted {
        return Err(std::io::Error::other(format!(
            "upgrade refused: {}",
            text.lines().next().unwrap_or("")
        )));
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(32 * 1024 * 1024);
    let rest = head[end..].to_vec();
    Ok(if rest.is_empty() {
        WebSocketStream::from_raw_socket(tcp, Role::Client, Some(config)).await
    } else {
        WebSocketStream::from_partially_read(tcp, rest, Role::Client, Some(config)).await
    })
}

// ---------------------------------------------------------------------------------------------
// Open-loop dr

/// One keep-alive HTTP/1.1 connection.
struct Http {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(addr: SocketAddr) -> std::io::Result<Http> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Sends one request and reads its response; returns the status.
    async fn post(&mut self, request: &[u8]) -> std::io::Result<u16> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        let (head_end, status, length) = loop {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])
                    .map_err(|_| std::io::Error::other("non-UTF-8 head"))?;
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| std::io::Error::other("bad status line"))?;
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .ok_or_else(|| std::io::Error::other("no content-length"))?;
                break (end + 4, status, length);
            }
        };
        while self.buf.len() < head_end + length {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(status)
    }
}

/// The `codemantle_command_duration_seconds` lines of the server's `/metrics`.
async fn server_histogram(addr: SocketAddr, bearer: &str) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect(addr).await?;
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Connection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut body = Vec::new();
    tcp.read_to_end(&mut body).await?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with("codemantle_command_duration_seconds"))
        .collect::<Vec<_>>()
        .join("\n"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Default)]
struct Latencies {
    /// Microseconds, from scheduled send time to the end of the response.
    micros: Vec<u64>,
    errors: u64,
    /// Requests sent, warm-up included.
    sent: u64,
    /// (scheduled offset ms, latency µs) of requests slower than `--slow-ms`.
    slow: Vec<(f64, u64, u64)>,
    statuses: HashMap<u16, u64>,
}

/// Sends `dr` requests open-loop at `rate` per second for `warmup + seconds`; records those
/// scheduled after the warm-up.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the knobs of one run"
)]
async fn open_loop(
    addr: SocketAddr,
    bearer: &str,
    devices: &[String],
    rate: u64,
    warmup: Duration,
    seconds: Duration,
    conns: usize,
    slow_us: Option<u64>,
) -> Latencies {
    let interval_ns = 1_000_000_000 / rate.max(1);
    let total = (warmup + seconds).as_nanos() as u64 / interval_ns;
    let skip = warmup.as_nanos() as u64 / interval_ns;
    let next = Arc::new(AtomicU64::new(0));
    let devices: Arc<Vec<String>> = Arc::new(devices.to_vec());
    let auth = format!("Bearer {bearer}");
    let mut https = Vec::new();
    for _ in 0..conns {
        https.push(Http::connect(addr).await.expect("HTTP connect"));
    }
    let t0 = Instant::now() + Duration::from_millis(100);
    let workers: Vec<_> = https
        .into_iter()
        .map(|mut http| {
            let (next, devices, auth) = (next.clone(), devices.clone(), auth.clone());
            smol::spawn(async move {
                let mut lat = Latencies::default();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= total {
                        break;
                    }
                    let scheduled = t0 + Duration::from_nanos(k * interval_ns);
                    smol::Timer::at(scheduled).await;
                    // How late this generator sends it (its own timer and executor).
                    let send_lag = scheduled.elapsed().as_micros() as u64;
                    let device = &devices[(splitmix(k) % devices.len() as u64) as usize];
                    let body = br#"{"path":"."}"#;
                    let request = format!(
                        "POST /devices/{device}/dir HTTP/1.1\r\nHost: {addr}\r\n\
                         Authorization: {auth}\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\n\r\n{}",
                        body.len(),
                        std::str::from_utf8(body).unwrap_or("{}")
                    );
                    let result = http.post(request.as_bytes()).await;
                    lat.sent += 1;
                    let micros = scheduled.elapsed().as_micros() as u64;
                    let record = k >= skip;
                    match result {
                        Ok(status) => {
                            if record {
                                *lat.statuses.entry(status).or_insert(0) += 1;
                                if status == 200 {
                                    lat.micros.push(micros);
                                    if slow_us.is_some_and(|t| micros >= t) {
                                        let at = (scheduled - t0).as_secs_f64() * 1000.0;
                                        lat.slow.push((at, micros, send_lag));
                                    }
                                } else {
                                    lat.errors += 1;
                                }
                            }
                        }
                        Err(e) => {
                            if record {
                                lat.errors += 1;
                            }
                            eprintln!("cm-loadgen: HTTP error: {e}; reconnecting");
                            match Http::connect(addr).await {
                                Ok(h) => http = h,
                                Err(_) => break,
                            }
                        }
                    }
                }
                lat
            })
        })
        .collect();
    let mut all = Latencies::default();
    for w in workers {
        let lat = w.await;
        all.micros.extend(lat.micros);
        all.errors += lat.errors;
        all.sent += lat.sent;
        all.slow.extend(lat.slow);
        for (s, n) in lat.statuses {
            *all.statuses.entry(s).or_insert(0) += n;
        }
    }
    all.micros.sort_unstable();
    all
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// One run

#[derive(Debug, Clone)]
struct Figures {
    handshakes_per_s: f64,
    storm_secs: f64,
    storm_failures: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    rss_end_kib: u64,
    bytes_per_device: f64,
    cp_cpu_storm_ms: u128,
    gen_cpu_storm_ms: u128,
    /// Server CPU time (user + system) per handshake during the storm.
    cp_cpu_per_handshake_us: f64,
    /// Server CPU time per `dr` request during the latency phase (pings included).
    cp_cpu_per_dr_us: f64,
    /// Share of the machine's CPU time (all CPUs) used by processes other than the server and
    /// this generator during the storm and during the `dr` phase: other work on the machine.
    others_storm: f64,
    others_dr: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    over_20ms: usize,
    requests: usize,
    errors: u64,
    achieved_rate: f64,
    still_connected: usize,
    pings_per_s: f64,
    threads: u64,
}

fn run_once(
    args: &Args,
    bin: &Path,
    template: &Path,
    fleet: &Fleet,
    workdir: &Path,
    run: usize,
) -> anyhow::Result<Figures> {
    let data = workdir.join(format!("run{run}-data"));
    copy_dir(template, &data)?;
    let log = workdir.join(format!("run{run}-cp.log"));
    let server = start_server(bin, &data, &log, args)?;
    let (addr, pid) = (server.addr, server.pid());
    let tree = sim_tree();
    let w = args.warmup_devices.min(fleet.devices.len());
    let (warm_set, storm_set) = fleet.devices.split_at(w);
    let me = std::process::id();

    // Warm-up devices, then the baseline.
    let warm = smol::block_on(storm(addr, warm_set, args.concurrency, &tree));
    anyhow::ensure!(
        warm.daemons.len() == warm_set.len(),
        "warm-up: only {} of {} devices connected (see {})",
        warm.daemons.len(),
        warm_set.len(),
        log.display()
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = rss_kib(pid);

    let perf = Perf::start(
        args,
        "storm",
        pid,
        &workdir.join(format!("run{run}-storm.perf")),
    );
    let perf_gen = Perf::start(
        args,
        "storm-gen",
        me,
        &workdir.join(format!("run{run}-gen.perf")),
    );
    let (cp_cpu0, gen_cpu0, busy0) = (cpu_time(pid), cpu_time(me), machine_busy());
    let s = smol::block_on(storm(addr, storm_set, args.concurrency, &tree));
    let (cp_cpu1, gen_cpu1, busy1) = (cpu_time(pid), cpu_time(me), machine_busy());
    let others_storm = others_share(
        busy1 - busy0,
        (cp_cpu1 + gen_cpu1) - (cp_cpu0 + gen_cpu0),
        s.took,
    );
    drop((perf, perf_gen));
    let n = s.daemons.len();
    eprintln!(
        "cm-loadgen: run {run}: {n} of {} devices connected in {:.2} s",
        storm_set.len(),
        s.took.as_secs_f64()
    );
    anyhow::ensure!(n > 0, "no device connected (see {})", log.display());

    // Steady state: at least one heartbeat round, and VmRSS stable.
    let hb = Duration::from_secs(u64::from(args.heartbeat));
    let after = steady_rss(pid, hb + Duration::from_secs(2));
    let frames_before: u64 = s.daemons.iter().map(SimDaemon::frames_received).sum();

    // Open-loop dr.
    let ids: Vec<String> = s.daemons.iter().map(|d| d.device_id.clone()).collect();
    let perf = Perf::start(args, "dr", pid, &workdir.join(format!("run{run}-dr.perf")));
    let lat_started = Instant::now();
    let (cp_cpu_dr0, gen_cpu_dr0, busy_dr0) = (cpu_time(pid), cpu_time(me), machine_busy());
    let lat = smol::block_on(open_loop(
        addr,
        &fleet.bearer,
        &ids,
        args.rate,
        Duration::from_secs(args.warmup_secs),
        Duration::from_secs(args.seconds),
        args.http_conns,
        args.slow_ms.map(|ms| ms * 1000),
    ));
    if args.slow_ms.is_some() {
        // The server's own view of the same commands (dispatch to device reply), to tell a
        // stall inside the server from one in this generator or the HTTP path.
        match smol::block_on(server_histogram(addr, &fleet.bearer)) {
            Ok(lines) => eprintln!("cm-loadgen: server-side command durations:\n{lines}"),
            Err(e) => eprintln!("cm-loadgen: could not read /metrics: {e}"),
        }
        let mut slow = lat.slow.clone();
        slow.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (at, us, lag) in slow {
            eprintln!(
                "cm-loadgen: slow dr at +{at:.0} ms: {:.2} ms (sent {:.2} ms late by this generator)",
                us as f64 / 1000.0,
                lag as f64 / 1000.0
            );
        }
    }
    let lat_wall = lat_started.elapsed().as_secs_f64();
    let (cp_cpu_dr1, gen_cpu_dr1, busy_dr1) = (cpu_time(pid), cpu_time(me), machine_busy());
    let cp_cpu_dr = cp_cpu_dr1.saturating_sub(cp_cpu_dr0);
    let others_dr = others_share(
        busy_dr1 - busy_dr0,
        cp_cpu_dr + gen_cpu_dr1.saturating_sub(gen_cpu_dr0),
        lat_started.elapsed(),
    );
    let lat_took = lat_wall - args.warmup_secs as f64 - 0.1;
    drop(perf);
    // Frames the devices got during the dr phase: every request, and the pings.
    let frames_after: u64 = s.daemons.iter().map(SimDaemon::frames_received).sum();
    let sent = lat.sent;
    let pings_per_s = (frames_after - frames_before).saturating_sub(sent) as f64 / lat_wall;
    let still_connected = s.daemons.iter().filter(|d| !d.is_closed()).count();
    let rss_end = rss_kib(pid);
    let threads = proc_status_kib(pid, "Threads:");
    if lat.errors > 0 {
        eprintln!("cm-loadgen: run {run}: HTTP statuses {:?}", lat.statuses);
    }
    let requests = lat.micros.len();
    let fig = Figures {
        handshakes_per_s: n as f64 / s.took.as_secs_f64(),
        storm_secs: s.took.as_secs_f64(),
        storm_failures: s.refused + s.failed,
        rss_before_kib: before,
        rss_after_kib: after,
        rss_end_kib: rss_end,
        bytes_per_device: (after as f64 - before as f64) * 1024.0 / n as f64,
        cp_cpu_storm_ms: (cp_cpu1 - cp_cpu0).as_millis(),
        gen_cpu_storm_ms: (gen_cpu1 - gen_cpu0).as_millis(),
        cp_cpu_per_handshake_us: (cp_cpu1 - cp_cpu0).as_secs_f64() * 1e6 / n as f64,
        cp_cpu_per_dr_us: cp_cpu_dr.as_secs_f64() * 1e6 / (lat.sent.max(1)) as f64,
        others_storm,
        others_dr,
        p50_us: percentile(&lat.micros, 50.0),
        p99_us: percentile(&lat.micros, 99.0),
        p999_us: percentile(&lat.micros, 99.9),
        max_us: lat.micros.last().copied().unwrap_or(0),
        over_20ms: lat.micros.iter().filter(|&&m| m > 20_000).count(),
        requests,
        errors: lat.errors,
        achieved_rate: (requests as u64 + lat.errors) as f64 / lat_took.max(1e-3),
        still_connected,
        pings_per_s,
        threads,
    };
    drop(server);
    drop((s, warm));
    Ok(fig)
}

// ---------------------------------------------------------------------------------------------
// Report

fn print_run(run: usize, f: &Figures, args: &Args) {
    println!(
        "run {run}: other processes used {:.0}% / {:.0}% of the CPUs during storm / dr | storm {:.2} s ({} failed; CPU during storm: server {} ms, \
         generator {} ms) | VmRSS {:.1} -> {:.1} MiB ({:.1} MiB at the end, {} threads) | {} dr \
         ok, {} errors, {:.0} req/s sent | {} of {} devices still connected, {:.0} pings/s",
        f.others_storm * 100.0,
        f.others_dr * 100.0,
        f.storm_secs,
        f.storm_failures,
        f.cp_cpu_storm_ms,
        f.gen_cpu_storm_ms,
        f.rss_before_kib as f64 / 1024.0,
        f.rss_after_kib as f64 / 1024.0,
        f.rss_end_kib as f64 / 1024.0,
        f.threads,
        f.requests,
        f.errors,
        f.achieved_rate,
        f.still_connected,
        args.devices,
        f.pings_per_s,
    );
}

fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn print_table(all: &[Figures], args: &Args) {
    let n = all.len();
    let col = |get: &dyn Fn(&Figures) -> f64| -> Vec<f64> { all.iter().map(get).collect() };
    let hs = col(&|f| f.handshakes_per_s);
    let kib = col(&|f| f.bytes_per_device / 1024.0);
    let p50 = col(&|f| f.p50_us as f64 / 1000.0);
    let p99 = col(&|f| f.p99_us as f64 / 1000.0);
    let p999 = col(&|f| f.p999_us as f64 / 1000.0);
    let max = col(&|f| f.max_us as f64 / 1000.0);
    let over = col(&|f| f.over_20ms as f64);
    let cpus = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(0);
    println!();
    println!(
        "cm-loadgen: {} devices (+{} warm-up), dr open loop at {} req/s for {} s, heartbeat {} s, \
         {} CPUs, {} run(s)",
        args.devices, args.warmup_devices, args.rate, args.seconds, args.heartbeat, cpus, n
    );
    println!(
        "{:<34} {:>12} {:>22} {:>12}  met",
        "metric", "best", "spread (min..max)", "goal"
    );
    let row = |name: &str, v: &[f64], higher_better: bool, unit: &str, goal: &str, ok: bool| {
        let (lo, hi) = spread(v);
        let best = if higher_better { hi } else { lo };
        let prec = if unit == "/s" { 0 } else { 2 };
        println!(
            "{:<34} {:>12} {:>22} {:>12}  {}",
            name,
            format!("{best:.prec$}{unit}"),
            format!("{lo:.prec$}..{hi:.prec$}"),
            goal,
            if ok { "yes" } else { "NO" }
        );
    };
    let best_hs = spread(&hs).1;
    row(
        "handshakes/s (connect storm)",
        &hs,
        true,
        "/s",
        ">= 9900/s",
        best_hs >= 9900.0,
    );
    let best_kib = spread(&kib).0;
    row(
        "RSS per connected device",
        &kib,
        false,
        " KiB",
        "<= 4 KiB",
        best_kib <= 4.0,
    );
    let cpu_hs = col(&|f| f.cp_cpu_per_handshake_us);
    row("server CPU per handshake", &cpu_hs, false, " us", "-", true);
    let best_cpu_hs = spread(&cpu_hs).0;
    let capacity = cpus as f64 * 1e6 / best_cpu_hs.max(1e-3);
    let cap = [capacity];
    row(
        &format!("  = server capacity on {cpus} CPUs"),
        &cap,
        true,
        "/s",
        "-",
        true,
    );
    row("dr p50", &p50, false, " ms", "-", true);
    let best_p99 = spread(&p99).0;
    row("dr p99", &p99, false, " ms", "<= 3 ms", best_p99 <= 3.0);
    row("dr p99.9", &p999, false, " ms", "-", true);
    let best_max = spread(&max).0;
    row("dr max", &max, false, " ms", "<= 20 ms", best_max <= 20.0);
    row(
        "dr requests over 20 ms",
        &over,
        false,
        "",
        "0",
        spread(&over).0 == 0.0,
    );
    let cpu_dr = col(&|f| f.cp_cpu_per_dr_us);
    row(
        "server CPU per dr (pings incl.)",
        &cpu_dr,
        false,
        " us",
        "-",
        true,
    );
    let others = all
        .iter()
        .map(|f| f.others_storm.max(f.others_dr))
        .fold(0.0, f64::max);
    if others > 0.05 {
        println!(
            "note: other processes used up to {:.0}% of the CPUs during these runs, so the \
             throughput and latency figures are pessimistic (server CPU per handshake is the \
             least affected); measure on a quiet machine",
            others * 100.0
        );
    }
}

/// CPU time all CPUs spent busy (not idle, not waiting for I/O) since boot (`/proc/stat`).
fn machine_busy() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Duration::ZERO;
    };
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = ticks.iter().take(8).sum::<u64>()
        - ticks.get(3).copied().unwrap_or(0)
        - ticks.get(4).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(busy * 1000 / hz)
}

/// Share of all CPUs' time over `wall` that went to processes other than ours: machine busy
/// time minus our processes' CPU time.
fn others_share(machine: Duration, ours: Duration, wall: Duration) -> f64 {
    let cpus = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1) as f64;
    let others = machine.as_secs_f64() - ours.as_secs_f64();
    (others / (wall.as_secs_f64() * cpus).max(1e-3)).clamp(0.0, 1.0)
}

fn run_all(args: &Args, nofile: u64) -> anyhow::Result<()> {
    let need = (args.devices + args.warmup_devices + args.http_conns + 64) as u64;
    if nofile < need {
        eprintln!(
            "cm-loadgen: warning: RLIMIT_NOFILE is {nofile}, {need} descriptors are needed; \
             raise the hard limit (ulimit -Hn)"
        );
    }
    let bin = server_binary(args)?;
    let workdir = tempfile::Builder::new().prefix("cm-loadgen-").tempdir()?;
    let template = workdir.path().join("template");
    let total = args.devices + args.warmup_devices;
    let started = Instant::now();
    let fleet = provision(&template, total)?;
    eprintln!(
        "cm-loadgen: provisioned {total} devices in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        workdir.path().display()
    );
    let mut all = Vec::new();
    for run in 1..=args.runs {
        let f = run_once(args, &bin, &template, &fleet, workdir.path(), run)?;
        print_run(run, &f, args);
        all.push(f);
        let _ = std::fs::remove_dir_all(workdir.path().join(format!("run{run}-data")));
    }
    print_table(&all, args);
    if args.keep || args.perf.is_some() {
        let kept = workdir.keep();
        eprintln!("cm-loadgen: kept {}", kept.display());
    }
    Ok(())
}
