//! Fault: `kill -9` of the control plane with a fleet connected — 3 real daemons and 200
//! simulated ones — then a restart.
//!
//! What it proves:
//! - everything reconnects to the restarted control plane, and the real daemons' next commands
//!   work;
//! - the real daemons spread their reconnects with full jitter: every delay they logged is
//!   within `[0, min(cap, base·2^attempt)]` of their `[reconnect]` settings, and the delays are
//!   not all the same;
//! - the reconnect wave after a 1 s outage is spread, not a herd: the simulated daemons (same
//!   back-off policy, see `codemantle_tests::fleet`) span more than 200 ms and no 100 ms window
//!   holds more than half of them;
//! - the event log survived the crash (every event from before is still there, unchanged) and
//!   continues with no gap: one `device.connected` per device after the restart.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use codemantle_tests::fault::raise_nofile;
use codemantle_tests::fleet::{self, Fleet, FleetConfig, peak_per_bucket};
use codemantle_tests::harness::{ControlPlane, Daemon, assert_gap_free, wait_until};
use serde_json::json;

const SIMS: usize = 200;
const REAL: usize = 3;
/// The harness's daemon `[reconnect]` settings (and the fleet's).
const BASE_MS: u64 = 200;
const CAP_MS: u64 = 2000;
const OUTAGE: Duration = Duration::from_secs(1);
/// Width of the window in which reconnects are counted.
const WINDOW: Duration = Duration::from_millis(100);

fn online_count(cp: &ControlPlane) -> usize {
    let (status, body) = cp.get("/devices");
    if status != 200 {
        return 0;
    }
    body["devices"]
        .as_array()
        .map_or(0, |d| d.iter().filter(|d| d["status"] == "online").count())
}

/// `(delay ms, attempt)` of every "reconnecting in N ms (attempt K)" line of a daemon log.
fn reconnect_delays(log: &str) -> Vec<(u64, u32)> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("reconnecting in ")? + "reconnecting in ".len()..];
            let (ms, rest) = rest.split_once(" ms (attempt ")?;
            let attempt = rest.split(')').next()?;
            Some((ms.trim().parse().ok()?, attempt.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn control_plane_kill_with_a_fleet_connected() {
    let t0 = Instant::now();
    raise_nofile();
    let mut cp = ControlPlane::start();
    let devices = fleet::register(&mut cp, "ckill", SIMS + REAL);
    let (real_devs, sim_devs) = devices.split_at(REAL);
    let mut daemons: Vec<Daemon> = real_devs
        .iter()
        .map(|d| Daemon::start(&cp.ws_url(), &d.credentials(cp.dir.path())))
        .collect();
    let addr = format!("127.0.0.1:{}", cp.port).parse().expect("addr");
    let sims = Fleet::start(&FleetConfig::new(addr), sim_devs);
    assert!(
        sims.wait(Duration::from_secs(30), |f| f.online() == SIMS),
        "{} of {SIMS} simulated daemons connected",
        sims.online()
    );
    wait_until(Duration::from_secs(30), "the whole fleet online", || {
        online_count(&cp) == SIMS + REAL
    });
    let setup = t0.elapsed();
    // Connect events ride the store's periodic flush (500 ms); let it pass so the crash
    // only loses what a crash may lose, and nothing this test counts on.
    std::thread::sleep(Duration::from_millis(1200));
    let before = cp.events_after(0);
    assert_gap_free(&before, 1);
    let last_before = before
        .last()
        .and_then(|e| e["seq"].as_u64())
        .expect("events");

    // Down for a second: long enough for a few failed dials each, so the back-off climbs.
    cp.kill();
    std::thread::sleep(OUTAGE);
    let restarted = Instant::now();
    cp.spawn();
    let up = restarted.elapsed();
    assert!(
        sims.wait(Duration::from_secs(30), |f| {
            f.first_connect_after(restarted).iter().all(Option::is_some)
        }),
        "{} of {SIMS} simulated daemons reconnected",
        sims.first_connect_after(restarted)
            .iter()
            .filter(|c| c.is_some())
            .count()
    );
    wait_until(
        Duration::from_secs(30),
        "the whole fleet online again",
        || online_count(&cp) == SIMS + REAL,
    );
    let reconnected = restarted.elapsed();

    // The simulated wave: spread, no herd.
    let times: Vec<Instant> = sims
        .first_connect_after(restarted)
        .into_iter()
        .flatten()
        .collect();
    let (peak, span) = peak_per_bucket(restarted, &times, WINDOW);
    let first = times.iter().min().expect("times").duration_since(restarted);
    eprintln!(
        "control plane down {OUTAGE:?}, serving again after {up:?}; {SIMS} simulated daemons \
         reconnected between {first:?} and {:?} (span {span:?}), busiest {WINDOW:?}: {peak}; \
         all online after {reconnected:?}",
        first + span
    );
    // After a 1 s outage every device's current window is at least 800 ms (200 + 400 ms of
    // earlier windows cannot cover 1 s), so about N·100/800 = N/8 land in the busiest 100 ms;
    // a herd would put all N there. N/2 leaves room for a machine that stalls and bunches them.
    assert!(span > 2 * WINDOW, "all {SIMS} reconnects within {span:?}");
    assert!(
        peak <= SIMS / 2,
        "{peak} of {SIMS} reconnects within one {WINDOW:?} window"
    );

    // The real daemons: every delay within the full-jitter window, and not all the same.
    let mut all_delays = Vec::new();
    for d in &daemons {
        let delays = reconnect_delays(&d.log());
        assert!(!delays.is_empty(), "no reconnect logged:\n{}", d.log());
        for &(ms, attempt) in &delays {
            let ceiling = BASE_MS
                .saturating_mul(1 << (attempt.saturating_sub(1)).min(20))
                .min(CAP_MS);
            assert!(
                ms <= ceiling,
                "delay {ms} ms at attempt {attempt} is above min(cap, base·2^attempt) = {ceiling}"
            );
        }
        all_delays.extend(delays.iter().map(|(ms, _)| *ms));
    }
    eprintln!("real daemons' reconnect delays (ms): {all_delays:?}");
    let distinct: HashSet<u64> = all_delays.iter().copied().collect();
    assert!(
        distinct.len() > 1,
        "every reconnect delay was the same: {all_delays:?}"
    );

    // Everything from before the crash is still there, unchanged, and the log goes on with no
    // gap: a device.connected for every device after the restart.
    let after = cp.events_after(0);
    assert_gap_free(&after, 1);
    assert!(after.len() as u64 > last_before);
    assert_eq!(&after[..before.len()], &before[..]);
    let mut connected: HashMap<&str, usize> = HashMap::new();
    for e in &after[before.len()..] {
        if e["kind"] == "device.connected" {
            *connected
                .entry(e["detail"]["device"].as_str().unwrap_or(""))
                .or_default() += 1;
        }
    }
    for d in &devices {
        assert!(
            connected.get(d.id.as_str()).copied().unwrap_or(0) >= 1,
            "no device.connected for {} after the restart",
            d.id
        );
    }

    // The real daemons answer commands again.
    for (d, dev) in daemons.iter_mut().zip(real_devs) {
        let (status, body) = cp.post(
            &format!("/devices/{}/mkdir", dev.id),
            json!({"path": "after-crash"}),
        );
        assert_eq!(status, 200, "{body}\n{}", d.log());
        assert!(d.path("after-crash").is_dir());
    }
    eprintln!(
        "setup {setup:?}, whole test {:?} (fleet of {} + {REAL} daemons)",
        t0.elapsed(),
        sims.len()
    );
}
