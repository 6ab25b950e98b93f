//! `cm-soak`: the soak harness as one command (see `codemantle_tests::soak` for what it runs,
//! which faults it injects and which invariants it checks).
//!
//! ```text
//! cargo run --release --locked -p codemantle-tests --bin cm-soak -- --duration 10m --fleet 1000
//! ```
//!
//! Under `cargo run` it first builds the control plane, the daemon and `cm-fake-opencode` in
//! the same profile (they must sit next to this binary). Needs root: it mounts a tmpfs in a temp
//! dir and creates two network namespaces of its own (all removed at the end).
//!
//! Flags: `--duration D` (default 10m; `90s`, `10m`, `1h`) `--fleet N` (simulated daemons,
//! default 1000) `--fault-every D` (one fault per slot, kinds round-robin; default 20s)
//! `--partition D` (link down; default 12s) `--disk-full D` (default 5s) `--cp-down D` (default
//! 1s) `--tmpfs-mb M` (the control plane's data disk; default 256) `--pause D` (between two
//! commands of a worker; default 100ms) `--deltas N` / `--gap-ms MS` (per prompt; default 40 /
//! 50) `--give-up D` (retry limit of one command; default 7m).
//!
//! Prints progress to stderr, the table to stdout, then one line `SOAK-SUMMARY {json}`; exits 1
//! if an invariant was violated, 2 on bad flags or a failed setup.

use std::process::{Command, ExitCode};
use std::time::Duration;

use codemantle_tests::soak::{self, Namespaces, SoakConfig};

const USAGE: &str = "usage: cm-soak [--duration 10m] [--fleet 1000] [--fault-every 20s] \
[--partition 12s] [--disk-full 5s] [--cp-down 1s] [--tmpfs-mb 256] [--pause 100ms] \
[--deltas 40] [--gap-ms 50] [--give-up 7m]";

fn parse(args: &[String]) -> Result<SoakConfig, String> {
    let mut cfg = SoakConfig::new(Duration::from_secs(600), 1000);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .as_str();
        let dur = || soak::parse_duration(value).ok_or(format!("{flag}: bad duration {value:?}"));
        let num = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: bad number {value:?}"))
        };
        match flag.as_str() {
            "--duration" => cfg.duration = dur()?,
            "--fleet" => cfg.fleet = usize::try_from(num()?).map_err(|e| e.to_string())?,
            "--fault-every" => cfg.fault_every = dur()?.max(Duration::from_secs(1)),
            "--partition" => cfg.partition = dur()?,
            "--disk-full" => cfg.disk_full = dur()?,
            "--cp-down" => cfg.cp_down = dur()?,
            "--tmpfs-mb" => cfg.tmpfs_bytes = num()?.max(16) * 1024 * 1024,
            "--pause" => cfg.command_pause = dur()?,
            "--deltas" => cfg.prompt_deltas = u32::try_from(num()?).map_err(|e| e.to_string())?,
            "--gap-ms" => cfg.prompt_gap_ms = u32::try_from(num()?).map_err(|e| e.to_string())?,
            "--give-up" => cfg.give_up_after = dur()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(cfg)
}

/// Under `cargo run`, builds the binaries the soak starts, in this binary's profile.
fn build_binaries() -> Result<(), String> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile = match exe
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
    {
        Some("debug") | None => "dev".to_owned(),
        Some(p) => p.to_owned(),
    };
    eprintln!("cm-soak: building the control plane, the daemon and the fake OpenCode ({profile})");
    let status = Command::new(cargo)
        .args(["build", "--locked", "--profile", &profile])
        .args([
            "-p",
            "codemantle-control-plane",
            "--bin",
            "codemantle-control-plane",
        ])
        .args(["-p", "codemantle-daemon", "--bin", "codemantle-daemon"])
        .args(["-p", "codemantle-tests", "--bin", "cm-fake-opencode"])
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err("building the binaries failed".into())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("cm-soak: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = build_binaries() {
        eprintln!("cm-soak: {e}");
        return ExitCode::from(2);
    }
    // First, before any thread exists: every thread and process of this run inherits the
    // namespace.
    let ns = match Namespaces::create_and_enter() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!(
                "cm-soak: {e}\nthe soak needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2"
            );
            return ExitCode::from(2);
        }
    };
    let report = match soak::run(&cfg, &ns) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cm-soak: the run failed: {e:#}");
            return ExitCode::from(2);
        }
    };
    drop(ns);
    print!("{}", report.table());
    println!("SOAK-SUMMARY {}", report.summary_json());
    if report.violations().is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("--- control plane log (tail) ---\n{}", report.cp_log_tail);
        ExitCode::from(1)
    }
}
