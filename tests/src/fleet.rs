//! Fleets of simulated daemons for the fault tests: many devices registered at once, and
//! simulated daemons that stay connected the way real ones do — when the link ends they wait a
//! full-jitter back-off delay and dial again — recording when each handshake completed.
//!
//! [`Backoff`] mirrors the daemon's policy (`codemantle_daemon::backoff`, which this crate does
//! not depend on): the delay is uniform in `[0, min(cap, base·2^attempt)]` and the attempt
//! counter grows with every delay. (The daemon resets it only after a link stayed up
//! `stable_after_s`, 60 s by default, longer than any test here, so the mirror never resets.)
//! The random numbers come from a seeded [`SplitMix64`] per device, so a run's delays are
//! reproducible; only the machine's timing varies.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codemantle_control_plane::registry::{self, NewDevice};
use codemantle_control_plane::store::TenantId;
use codemantle_control_plane::store::sled::SledStore;

use crate::harness::{ControlPlane, DeviceCredentials};
use crate::simdaemon::{Handshake, SimConfig, SimDaemon, Tree};

/// A registered simulated device: its id and secret (device key).
#[derive(Debug, Clone)]
pub struct FleetDevice {
    pub id: String,
    pub secret: String,
}

impl FleetDevice {
    /// The device as the harness's [`crate::harness::Daemon`] wants it: its key written to
    /// `<dir>/<id>.key` (0600).
    pub fn credentials(&self, dir: &std::path::Path) -> DeviceCredentials {
        use std::os::unix::fs::PermissionsExt as _;
        let key_file = dir.join(format!("{}.key", self.id));
        std::fs::write(&key_file, format!("{}\n", self.secret)).expect("write key file");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod key file");
        DeviceCredentials {
            id: self.id.clone(),
            key_file,
        }
    }
}

/// Registers `n` devices (ids `dev_<prefix><i:06>`) in the control plane's store the way
/// `device add` does, with the server stopped for it (restarted afterwards if it was running).
pub fn register(cp: &mut ControlPlane, prefix: &str, n: usize) -> Vec<FleetDevice> {
    let running = cp.pid().is_some();
    if running {
        cp.stop();
    }
    let store = SledStore::open(&cp.data_dir()).expect("open the stopped server's store");
    let tenant = TenantId::default_tenant();
    let devices = (0..n)
        .map(|i| {
            let new = NewDevice {
                name: format!("{prefix}-{i}"),
                labels: Default::default(),
                id: Some(format!("dev_{prefix}{i:06}")),
            };
            let (device, _) =
                registry::create_device(&store, &tenant, new, "test").expect("register device");
            FleetDevice {
                id: device.id,
                secret: device.secret,
            }
        })
        .collect();
    drop(store);
    if running {
        cp.spawn();
    }
    devices
}

/// SplitMix64: a tiny seeded PRNG (good enough for jitter and fuzzing, not for secrets).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The daemon's full-jitter reconnect delay (see the module doc).
#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// `min(cap, base·2^attempt)`: the largest delay the next call can return.
    pub fn ceiling(&self) -> Duration {
        self.base
            .checked_mul(1u32 << self.attempt.min(31))
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// The next delay, uniform in `[0, ceiling]`; advances the attempt counter.
    pub fn next_delay(&mut self, rand: u64) -> Duration {
        let ceiling = u64::try_from(self.ceiling().as_millis()).unwrap_or(u64::MAX - 1);
        self.attempt = self.attempt.saturating_add(1).min(62);
        Duration::from_millis(rand % (ceiling + 1))
    }
}

/// What one simulated device did.
#[derive(Debug, Default)]
struct DeviceLog {
    /// When each handshake completed.
    connects: Mutex<Vec<Instant>>,
    /// Dials that did not end in a handshake (connection refused, refused handshake).
    failures: AtomicU64,
    online: AtomicBool,
}

/// Settings of a [`Fleet`].
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Control plane address (`ip:port`).
    pub addr: SocketAddr,
    /// Back-off base and cap, as a daemon's `[reconnect]` section.
    pub base: Duration,
    pub cap: Duration,
    /// Seed of the per-device jitter generators (device `i` uses `seed + i`).
    pub seed: u64,
    /// How often a connected device checks whether its link ended.
    pub poll: Duration,
    /// Handshake time limit of each dial.
    pub handshake_timeout: Duration,
}

impl FleetConfig {
    pub fn new(addr: SocketAddr) -> FleetConfig {
        FleetConfig {
            addr,
            base: Duration::from_millis(200),
            cap: Duration::from_millis(2000),
            seed: 0x00C0_DE3A_417E,
            poll: Duration::from_millis(100),
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Simulated daemons that keep reconnecting until the fleet is dropped. Every device dials at
/// once when the fleet starts (a storm); later dials follow the back-off.
pub struct Fleet {
    logs: Vec<Arc<DeviceLog>>,
    tasks: Vec<smol::Task<()>>,
    started: Instant,
}

impl Fleet {
    pub fn start(config: &FleetConfig, devices: &[FleetDevice]) -> Fleet {
        // One shared in-memory tree: the fleet only needs handshakes and liveness.
        let tree = Arc::new(Mutex::new(Tree::default()));
        let mut logs = Vec::with_capacity(devices.len());
        let mut tasks = Vec::with_capacity(devices.len());
        for (i, dev) in devices.iter().enumerate() {
            let log = Arc::new(DeviceLog::default());
            let mut sim = SimConfig::new(config.addr, &dev.id, &dev.secret);
            sim.tree = tree.clone();
            sim.timeout = config.handshake_timeout;
            let seed = config.seed.wrapping_add(i as u64);
            tasks.push(smol::spawn(keep_connected(
                sim,
                log.clone(),
                Backoff::new(config.base, config.cap),
                SplitMix64::new(seed),
                config.poll,
            )));
            logs.push(log);
        }
        Fleet {
            logs,
            tasks,
            started: Instant::now(),
        }
    }

    /// When the fleet started dialling.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn len(&self) -> usize {
        self.logs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }

    /// Devices whose link is up now.
    pub fn online(&self) -> usize {
        self.logs
            .iter()
            .filter(|l| l.online.load(Ordering::Acquire))
            .count()
    }

    /// Dials that failed so far, over all devices.
    pub fn failures(&self) -> u64 {
        self.logs
            .iter()
            .map(|l| l.failures.load(Ordering::Relaxed))
            .sum()
    }

    /// Completed handshakes so far, over all devices.
    pub fn connects(&self) -> usize {
        self.logs
            .iter()
            .map(|l| l.connects.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// For every device, when its first handshake at or after `t` completed (if one did).
    pub fn first_connect_after(&self, t: Instant) -> Vec<Option<Instant>> {
        self.logs
            .iter()
            .map(|l| {
                l.connects
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .copied()
                    .find(|c| *c >= t)
            })
            .collect()
    }

    /// Polls until `ok(self)` holds or `limit` passes; returns whether it held.
    pub fn wait(&self, limit: Duration, ok: impl Fn(&Fleet) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if ok(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops every device (their connections close).
    pub fn stop(&mut self) {
        self.tasks.clear();
        for l in &self.logs {
            l.online.store(false, Ordering::Release);
        }
    }
}

async fn keep_connected(
    sim: SimConfig,
    log: Arc<DeviceLog>,
    mut backoff: Backoff,
    mut rng: SplitMix64,
    poll: Duration,
) {
    loop {
        match SimDaemon::connect(sim.clone()).await {
            Ok(Handshake::Accepted(daemon)) => {
                log.connects
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Instant::now());
                log.online.store(true, Ordering::Release);
                while !daemon.is_closed() {
                    smol::Timer::after(poll).await;
                }
                log.online.store(false, Ordering::Release);
            }
            Ok(Handshake::Refused(_)) | Err(_) => {
                log.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        smol::Timer::after(backoff.next_delay(rng.next_u64())).await;
    }
}

/// Counts of `times` (relative to `origin`) per bucket of `width`: `(peak bucket count, span
/// from first to last)`.
pub fn peak_per_bucket(origin: Instant, times: &[Instant], width: Duration) -> (usize, Duration) {
    let mut offsets: Vec<u128> = times
        .iter()
        .map(|t| t.saturating_duration_since(origin).as_micros())
        .collect();
    offsets.sort_unstable();
    let w = width.as_micros().max(1);
    let mut peak = 0;
    let mut i = 0;
    // Sliding window: the most events within any `width`-long interval.
    for j in 0..offsets.len() {
        while offsets[j] - offsets[i] >= w {
            i += 1;
        }
        peak = peak.max(j - i + 1);
    }
    let span = match (offsets.first(), offsets.last()) {
        (Some(a), Some(b)) => Duration::from_micros(u64::try_from(b - a).unwrap_or(u64::MAX)),
        _ => Duration::ZERO,
    };
    (peak, span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceilings_double_to_the_cap_and_delays_stay_below() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_millis(2000));
        let mut rng = SplitMix64::new(7);
        let mut ceilings = Vec::new();
        for _ in 0..7 {
            let c = b.ceiling();
            ceilings.push(c.as_millis());
            assert!(b.next_delay(rng.next_u64()) <= c);
        }
        assert_eq!(ceilings, [200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn splitmix_is_seeded() {
        let a: Vec<u64> = {
            let mut r = SplitMix64::new(1);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let mut r = SplitMix64::new(1);
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn peak_counts_the_busiest_window() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let times = [at(0), at(10), at(20), at(200), at(210), at(500)];
        let (peak, span) = peak_per_bucket(t0, &times, Duration::from_millis(50));
        assert_eq!(peak, 3);
        assert_eq!(span, Duration::from_millis(500));
    }
}
