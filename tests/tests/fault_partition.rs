//! Fault: a network partition between a real daemon and the control plane.
//!
//! Both run in network namespaces of their own (`cmtest-<pid>-<n>-…`, deleted afterwards),
//! joined by a veth pair with a private /30 that exists only inside them (10.213.7.1 daemon,
//! 10.213.7.2 control plane; no default route, no forwarding, nothing on the host's
//! interfaces). The control plane's heartbeat is 5 s (the minimum). Cutting the link
//! (`ip link set … down` in the daemon's namespace) sends nothing: no FIN, no RST, both sides
//! just stop hearing from each other. What it proves:
//! - the control plane marks the device offline on its own within 2×hb (its `dead_after`) of
//!   the cut, before the daemon gives up;
//! - the daemon notices within 3×hb;
//! - once the link is back, the daemon reconnects by itself (back-off cap 2 s) and the next
//!   command works.
//!
//! Needs root and iproute2 (`ip netns`); without them the test fails saying so — it never
//! passes without having cut a link.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use codemantle_tests::fault::NetNs;
use codemantle_tests::harness::{ControlPlane, CpOptions, Daemon};
use serde_json::json;

const HB: Duration = Duration::from_secs(5);
const CP_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 2);
const DAEMON_IF: &str = "cmveth-d";

fn need<T>(what: &str, r: std::io::Result<T>) -> T {
    r.unwrap_or_else(|e| {
        panic!(
            "{what}: {e}\nthe partition test needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and \
             iproute2's `ip netns`"
        )
    })
}

/// Polls `ok` every 100 ms for up to `limit`; returns when it first held.
fn when(limit: Duration, mut ok: impl FnMut() -> bool) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn a_cut_link_is_noticed_on_both_sides_and_heals() {
    let t0 = Instant::now();
    let daemon_ns = need("creating the daemon's namespace", NetNs::create("d"));
    let cp_ns = need(
        "creating the control plane's namespace",
        NetNs::create("cp"),
    );
    need(
        "creating the veth pair",
        NetNs::veth_pair(
            &daemon_ns,
            DAEMON_IF,
            "10.213.7.1/30",
            &cp_ns,
            "cmveth-cp",
            "10.213.7.2/30",
        ),
    );

    // Everything that opens a socket or starts a process runs inside its namespace.
    let mut cp = cp_ns.run(|| {
        ControlPlane::start_with(CpOptions {
            config: Some("[tunnel]\nheartbeat_secs = 5\n".into()),
            listen_ip: Some(IpAddr::V4(CP_IP)),
            ..CpOptions::default()
        })
    });
    let dev = cp_ns.run(|| cp.add_device("partitioned"));
    let ws_url = cp.ws_url();
    let daemon = daemon_ns.run(|| Daemon::start(&ws_url, &dev));
    cp_ns.run(|| cp.wait_online(&dev.id));
    let status = || {
        cp_ns.run(|| {
            let (code, body) = cp.get(&format!("/devices/{}", dev.id));
            assert_eq!(code, 200, "{body}");
            body["device"]["status"].as_str().unwrap_or("").to_owned()
        })
    };
    let (code, body) = cp_ns.run(|| {
        cp.post(
            &format!("/devices/{}/mkdir", dev.id),
            json!({"path": "before"}),
        )
    });
    assert_eq!(code, 200, "{body}");

    // Cut.
    need(
        "taking the daemon's link down",
        daemon_ns.ip(&["link", "set", DAEMON_IF, "down"]),
    );
    let cut = Instant::now();
    let mut cp_offline = None;
    let mut daemon_noticed = None;
    when(4 * HB, || {
        if cp_offline.is_none() && status() == "offline" {
            cp_offline = Some(cut.elapsed());
        }
        if daemon_noticed.is_none() && daemon.log().contains("heartbeat timeout") {
            daemon_noticed = Some(cut.elapsed());
        }
        cp_offline.is_some() && daemon_noticed.is_some()
    });
    eprintln!(
        "link cut: control plane offline after {cp_offline:?}, daemon noticed after {daemon_noticed:?}"
    );
    let cp_offline = cp_offline.unwrap_or_else(|| {
        panic!(
            "the control plane never marked the device offline\n{}",
            cp.log()
        )
    });
    let daemon_noticed =
        daemon_noticed.unwrap_or_else(|| panic!("the daemon never noticed\n{}", daemon.log()));
    // The last sign of life was at most at the cut; slack for polling and a loaded machine.
    let slack = Duration::from_millis(1500);
    assert!(
        cp_offline <= 2 * HB + slack,
        "control plane took {cp_offline:?} to mark the device offline (hb {HB:?})"
    );
    assert!(
        daemon_noticed <= 3 * HB + slack,
        "daemon took {daemon_noticed:?} to notice (hb {HB:?})"
    );
    assert!(
        cp_offline < daemon_noticed,
        "2×hb on the control plane should expire before 3×hb on the daemon"
    );

    // Heal: the daemon is back by itself within its back-off cap (2 s) plus a handshake.
    need(
        "bringing the daemon's link up",
        daemon_ns.ip(&["link", "set", DAEMON_IF, "up"]),
    );
    let healed = Instant::now();
    let online = when(Duration::from_secs(15), || status() == "online")
        .unwrap_or_else(|| panic!("no reconnect after the link came back\n{}", daemon.log()));
    eprintln!("link restored: online again after {:?}", online - healed);
    let (code, body) = cp_ns.run(|| {
        cp.post(
            &format!("/devices/{}/mkdir", dev.id),
            json!({"path": "after"}),
        )
    });
    assert_eq!(code, 200, "{body}\n{}", daemon.log());
    assert!(daemon.path("after").is_dir());
    eprintln!("partition test {:?}", t0.elapsed());
    // Processes end before their namespaces go.
    drop(daemon);
    drop(cp);
}
