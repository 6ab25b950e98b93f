//! Fault: a reconnect storm — 1,000 simulated daemons (one process) dial a real control plane
//! at the same moment.
//!
//! What it proves: every handshake succeeds (no refusal, no timeout, no retry needed) within
//! 30 s on a loaded 2-core machine; `/health` keeps answering during the storm, each probe in
//! under a second; afterwards every device is `online` in the API, and when the fleet goes away
//! every device ends `offline` — none is left in a wrong state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use codemantle_control_plane::client::Request;
use codemantle_tests::fault::raise_nofile;
use codemantle_tests::fleet::{self, Fleet, FleetConfig};
use codemantle_tests::harness::{ControlPlane, wait_until};

const DEVICES: usize = 1000;
const STORM_LIMIT: Duration = Duration::from_secs(30);
const PROBE_LIMIT: Duration = Duration::from_secs(1);

fn statuses(cp: &ControlPlane) -> Vec<String> {
    let (status, body) = cp.get("/devices");
    assert_eq!(status, 200, "{body}");
    body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["status"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn count(statuses: &[String], which: &str) -> usize {
    statuses.iter().filter(|s| *s == which).count()
}

#[test]
fn a_thousand_daemons_connect_at_once() {
    let nofile = raise_nofile();
    assert!(
        nofile >= 2 * DEVICES as u64 + 256,
        "RLIMIT_NOFILE hard limit {nofile} is too low for {DEVICES} connections on each side"
    );
    let t0 = Instant::now();
    let mut cp = ControlPlane::start();
    let devices = fleet::register(&mut cp, "storm", DEVICES);
    let registered = t0.elapsed();
    assert_eq!(count(&statuses(&cp), "never-seen"), DEVICES);

    let addr = format!("127.0.0.1:{}", cp.port).parse().expect("addr");
    let done = AtomicBool::new(false);
    let (mut fleet, probes) = std::thread::scope(|s| {
        // /health every 100 ms while the storm lasts, on its own connection each time.
        let prober = s.spawn(|| {
            let mut probes: Vec<(Duration, u16)> = Vec::new();
            while !done.load(Ordering::Acquire) {
                let start = Instant::now();
                let status = smol::block_on(cp.client().send(Request::new("GET", "/health")))
                    .map(|r| r.status)
                    .unwrap_or(0);
                probes.push((start.elapsed(), status));
                std::thread::sleep(Duration::from_millis(100));
            }
            probes
        });
        let fleet = Fleet::start(&FleetConfig::new(addr), &devices);
        let all = fleet.wait(STORM_LIMIT, |f| f.connects() >= DEVICES);
        let storm = fleet.started().elapsed();
        done.store(true, Ordering::Release);
        let probes = prober.join().expect("prober");
        assert!(
            all,
            "{} of {DEVICES} handshakes after {storm:?} ({} failed dials)",
            fleet.connects(),
            fleet.failures()
        );
        eprintln!(
            "{DEVICES} handshakes in {storm:?} ({:.0}/s), registration took {registered:?}",
            DEVICES as f64 / storm.as_secs_f64()
        );
        (fleet, probes)
    });

    // Every dial succeeded the first time: nothing was refused or timed out.
    assert_eq!(fleet.failures(), 0, "failed dials during the storm");
    assert_eq!(fleet.connects(), DEVICES, "a device had to reconnect");
    // /health stayed responsive.
    assert!(!probes.is_empty());
    let slowest = probes.iter().map(|p| p.0).max().unwrap_or_default();
    eprintln!(
        "{} /health probes during the storm, slowest {slowest:?}",
        probes.len()
    );
    for (took, status) in &probes {
        assert_eq!(*status, 200, "a /health probe failed during the storm");
        assert!(*took < PROBE_LIMIT, "a /health probe took {took:?}");
    }

    // The API agrees: everyone online.
    wait_until(Duration::from_secs(15), "every device online", || {
        count(&statuses(&cp), "online") == DEVICES
    });
    // No stragglers: the fleet goes away, everyone ends offline (none stays online, none is
    // never-seen).
    fleet.stop();
    wait_until(Duration::from_secs(30), "every device offline", || {
        count(&statuses(&cp), "offline") == DEVICES
    });
    let (status, health) = cp.get("/health");
    assert_eq!(status, 200, "{health}");
    eprintln!("storm test {:?}", t0.elapsed());
}
