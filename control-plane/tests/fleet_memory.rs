//! Fleet-scale figures: what one connected, idle device costs the control plane.
//!
//! Both tests are ignored by default (they take a while and print figures rather than check
//! tight bounds). Run them with
//! `cargo test -p codemantle-control-plane --release --test fleet_memory -- --ignored --nocapture`
//! (`CODEMANTLE_FLEET_N=10000` for the full-size figure; needs 2 × N file descriptors).
//!
//! - `server_rss_per_connected_device`: the real server binary; VmRSS before and after N
//!   simulated daemons (native CBOR, one `p` each) connect. Includes everything: the tunnel's
//!   structures, the store's cache of the device records and connect events it wrote, allocator
//!   overhead and threads.
//! - `heap_per_connection`: an in-process server under a counting allocator, with the daemons in
//!   a child process (this test binary re-run as `sim_helper`), so the figure is the server's
//!   live heap only; the store's share is measured separately.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use codemantle_control_plane::api::{App, Server};
use codemantle_control_plane::registry::{self, NewDevice};
use codemantle_control_plane::store::sled::SledStore;
use codemantle_control_plane::store::{ConnectInfo, Store, TenantId};
use codemantle_control_plane::tunnel::TunnelConfig;
use codemantle_tests::simdaemon::{SimConfig, SimDaemon};

const SERVER: &str = env!("CARGO_BIN_EXE_codemantle-control-plane");

/// Counts live heap bytes of this process.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn fleet_size() -> usize {
    std::env::var("CODEMANTLE_FLEET_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn device_id(i: usize) -> String {
    format!("dev_fleet{i:010}")
}

/// Registers `count` devices; returns their secrets in order.
fn register(store: &dyn Store, count: usize) -> Vec<String> {
    let tenant = TenantId::default_tenant();
    (0..count)
        .map(|i| {
            let new = NewDevice {
                name: format!("box-{i}"),
                labels: Default::default(),
                id: Some(device_id(i)),
            };
            registry::create_device(store, &tenant, new, "bench")
                .expect("device")
                .0
                .secret
        })
        .collect()
}

/// Connects devices `range` of `secrets`, 200 at a time.
fn connect(addr: SocketAddr, secrets: &[String], range: std::ops::Range<usize>) -> Vec<SimDaemon> {
    let tree = Arc::new(Mutex::new(Default::default()));
    smol::block_on(async {
        let mut out = Vec::with_capacity(range.len());
        let ids: Vec<usize> = range.collect();
        for batch in ids.chunks(200) {
            let tasks: Vec<_> = batch
                .iter()
                .map(|&i| {
                    let mut c = SimConfig::new(addr, &device_id(i), &secrets[i]);
                    c.tree = tree.clone();
                    smol::spawn(SimDaemon::connect(c))
                })
                .collect();
            for t in tasks {
                out.push(t.await.expect("connect").accepted());
            }
        }
        out
    })
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "fleet-scale figure; run with --ignored --nocapture"]
fn server_rss_per_connected_device() {
    let n = fleet_size();
    let warmup = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let secrets = {
        let store = SledStore::open(&data).expect("store");
        codemantle_control_plane::admin::init(&store).expect("init");
        let secrets = register(&store, n + warmup);
        store.flush().expect("flush");
        secrets
    };
    let mut child = Command::new(SERVER)
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "serve"])
        .env_remove("CODEMANTLE_CONFIG")
        // The "listening on" line (info, from main) but not a line per connection or request.
        .env(
            "CODEMANTLE_LOG",
            "warn,codemantle_control_plane=info,codemantle_control_plane::tunnel=warn,\
             codemantle_control_plane::api=warn",
        )
        .env("CODEMANTLE_HEARTBEAT_SECS", "60")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let stderr = child.stderr.take().expect("stderr");
    let pid = child.id();
    let server = Killed(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening on http://") {
                let rest = &line[i + "listening on http://".len()..];
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server did not report its address")
        .parse()
        .expect("addr");

    let warm = connect(addr, &secrets, 0..warmup);
    std::thread::sleep(Duration::from_secs(2));
    let before = rss_kib(pid);
    let started = Instant::now();
    let fleet = connect(addr, &secrets, warmup..warmup + n);
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(pid);
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads"))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    println!(
        "fleet_memory: {n} devices connected in {:.1} s; server VmRSS {before} KiB -> {after} \
         KiB = {:.0} bytes per connected idle device ({threads})",
        took.as_secs_f64(),
        (after.saturating_sub(before) * 1024) as f64 / n as f64,
    );
    assert_eq!(fleet.len(), n);
    drop((warm, fleet, server));
}

/// The daemons of `heap_per_connection`, in their own process (so their allocations do not
/// count): connects `SIM_N` devices from `SIM_START`, prints READY, and holds them.
#[test]
#[ignore = "helper process of heap_per_connection"]
fn sim_helper() {
    let (Ok(addr), Ok(secrets)) = (std::env::var("SIM_ADDR"), std::env::var("SIM_SECRETS")) else {
        return;
    };
    let var = |k: &str| -> usize {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let secrets: Vec<String> = std::fs::read_to_string(secrets)
        .expect("secrets")
        .lines()
        .map(str::to_owned)
        .collect();
    let start = var("SIM_START");
    let sims = connect(
        addr.parse().expect("addr"),
        &secrets,
        start..start + var("SIM_N"),
    );
    println!("READY");
    std::thread::sleep(Duration::from_secs(60));
    drop(sims);
}

#[test]
#[ignore = "fleet-scale figure; run with --ignored --nocapture"]
fn heap_per_connection() {
    let n = fleet_size().min(5000);
    let dir = tempfile::tempdir().expect("tempdir");
    let sled = SledStore::open(&dir.path().join("data")).expect("store");
    codemantle_control_plane::admin::init(&sled).expect("init");
    let store: Arc<dyn Store> = Arc::new(sled);
    let secrets = register(store.as_ref(), 3 * n);
    let secrets_file = dir.path().join("secrets");
    std::fs::write(&secrets_file, secrets.join("\n")).expect("write secrets");
    let app = Arc::new(App::new(store.clone()).with_tunnel(TunnelConfig::with_heartbeat(60)));
    let server = smol::block_on(Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        None,
        app,
    ))
    .expect("bind");
    let addr = server.local_addr().expect("addr");
    smol::spawn(server.run()).detach();

    // The store's share: what reading a device's credential and recording its connect costs.
    let live_before_store = LIVE.load(Ordering::Relaxed);
    for i in 2 * n..3 * n {
        let id = device_id(i);
        store.device_credential(&id).expect("credential");
        let info = ConnectInfo {
            at_ms: 1,
            agent_version: Some("0.2.0-sim".into()),
            host: Default::default(),
            peer: Some("127.0.0.1:50000".into()),
            mode: Some("native".into()),
        };
        store.device_connected(&id, &info).expect("connected");
    }
    let store_share = (LIVE.load(Ordering::Relaxed) - live_before_store) / n as isize;

    let daemons = |start: usize| {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "sim_helper", "--ignored", "--nocapture"])
            .env("SIM_ADDR", addr.to_string())
            .env("SIM_SECRETS", &secrets_file)
            .env("SIM_START", start.to_string())
            .env("SIM_N", n.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn daemons");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        assert!(
            lines.any(|l| l.is_ok_and(|l| l.contains("READY"))),
            "the daemon process died"
        );
        Killed(child)
    };
    let warm = daemons(0);
    std::thread::sleep(Duration::from_secs(2));
    let before = LIVE.load(Ordering::Relaxed);
    let fleet = daemons(n);
    std::thread::sleep(Duration::from_secs(2));
    let after = LIVE.load(Ordering::Relaxed);
    let per = (after - before) / n as isize;
    println!(
        "fleet_memory: live heap per connected idle device: {per} bytes, of which the store's \
         cache of its record and connect event ≈ {store_share} bytes ({n} devices)"
    );
    drop((warm, fleet));
}
