//! A short soak (`cm-soak`, see `codemantle_tests::soak`) in the normal suite: about 70 s, a
//! fleet of 100 simulated daemons plus the 3 real ones, one fault of every kind (control plane
//! `kill -9`, daemon `kill -9`, partition, full disk, reconnect storm) while commands, a session
//! stream and an event follower run. It must end with every invariant held: no lost or
//! duplicated effect, no stream chunk lost or repeated, no event missing.
//!
//! It runs the `cm-soak` binary as its own process because the soak moves its whole process
//! into a network namespace of its own (every thread must be in it), which a test thread
//! sharing a process with other tests must not do. Needs root (a tmpfs mount and `ip netns`),
//! like the `fault_*` tests; without it `cm-soak` exits 2 saying so and this test fails.
//! The long run: `cargo run --release --locked -p codemantle-tests --bin cm-soak -- --duration
//! 10m --fleet 1000`.

use std::process::Command;

use serde_json::Value;

#[test]
fn a_short_soak_with_every_fault_kind_keeps_every_invariant() {
    let out = Command::new(env!("CARGO_BIN_EXE_cm-soak"))
        .args([
            "--duration",
            "70s",
            "--fleet",
            "100",
            "--fault-every",
            "13s",
        ])
        .args(["--partition", "6s", "--disk-full", "3s", "--pause", "50ms"])
        .args(["--deltas", "20", "--gap-ms", "40", "--give-up", "90s"])
        .args(["--tmpfs-mb", "128"])
        // Not under `cargo run`: the suite already built the binaries; no nested build.
        .env_remove("CARGO")
        .output()
        .expect("run cm-soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    let summary: Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SOAK-SUMMARY "))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_else(|| {
            panic!(
                "cm-soak printed no summary (exit {}):\n{stdout}\n--- stderr ---\n{stderr}",
                out.status
            )
        });
    assert!(
        out.status.success(),
        "cm-soak found violations: {}\n--- stderr ---\n{stderr}",
        summary["violations"]
    );
    for kind in ["cp_kill", "daemon_kill", "partition", "disk_full", "storm"] {
        assert!(
            summary["faults"][kind].as_u64().unwrap_or(0) >= 1,
            "no {kind} fault injected: {summary}"
        );
    }
    // The workload really ran, through the faults.
    assert!(
        summary["commands_succeeded"].as_u64().unwrap_or(0) >= 50,
        "{summary}"
    );
    assert!(
        summary["commands_retried"].as_u64().unwrap_or(0) >= 1,
        "{summary}"
    );
    assert!(summary["prompts"].as_u64().unwrap_or(0) >= 2, "{summary}");
    assert!(summary["chunks"].as_u64().unwrap_or(0) >= 20, "{summary}");
    assert!(
        summary["events_followed"].as_u64().unwrap_or(0) >= 100,
        "{summary}"
    );
    // The invariants themselves (cm-soak's exit status says the same; belt and braces).
    for key in [
        "lost_effects",
        "duplicated_effects",
        "chunks_lost",
        "chunks_duplicated",
        "events_missing",
    ] {
        assert_eq!(summary[key].as_u64(), Some(0), "{key}: {summary}");
    }
}
