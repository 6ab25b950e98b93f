//! The shipped systemd units pass `systemd-analyze verify` with no complaint at all.
//!
//! `verify` exits 0 even for unknown keys or unparsable values (it only warns on stderr), so
//! the test requires empty output. The units name `/usr/bin/...`; for the check their
//! executables are pointed at the freshly built binaries, which must exist for `verify`.

use std::path::Path;
use std::process::Command;

use codemantle_tests::bins::bin_path;

fn verify(unit: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(unit);
    let text = std::fs::read_to_string(&src).expect("unit file");
    let mut rewritten = text.clone();
    for bin in ["codemantle-daemon", "codemantle-control-plane"] {
        rewritten = rewritten.replace(
            &format!("/usr/bin/{bin} "),
            &format!("{} ", bin_path(bin).display()),
        );
    }
    assert_ne!(
        rewritten, text,
        "{unit}: ExecStart should name a CodeMantle binary"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(unit);
    std::fs::write(&path, rewritten).expect("write unit");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze must be installed (apt-get install systemd)");
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify {unit} complained:\n{complaints}"
    );
}

#[test]
fn daemon_unit_verifies() {
    verify("codemantle-daemon.service");
}

#[test]
fn control_plane_unit_verifies() {
    verify("codemantle-control-plane.service");
}

#[test]
fn units_are_type_notify_with_a_watchdog_and_no_capabilities() {
    for unit in [
        "codemantle-daemon.service",
        "codemantle-control-plane.service",
    ] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../systemd")
                .join(unit),
        )
        .expect("unit file");
        for line in [
            "Type=notify",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=\n",
        ] {
            assert!(text.contains(line), "{unit} lacks {line:?}");
        }
        assert!(
            text.lines().any(|l| l.starts_with("WatchdogSec=")),
            "{unit} lacks WatchdogSec"
        );
    }
    let daemon = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/codemantle-daemon.service"),
    )
    .expect("unit");
    assert!(
        daemon.contains("KillMode=process"),
        "sessions must survive a daemon restart"
    );
}
