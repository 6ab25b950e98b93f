//! `cm-escape-probe`: an "OpenCode" that tries to break out of its session's sandbox, for the
//! escape suite (`tests/tests/session_escape.rs`).
//!
//! The daemon starts it like OpenCode (`cm-escape-probe serve --hostname 127.0.0.1 --port
//! <port>`, allowlisted as `opencode`), so it runs exactly as a real session would: through the
//! process guard, as the `run_as` user, in the landlock sandbox, with the session's port. At
//! start it reads the plan [`PLAN_FILE`] from its working directory (the session's project
//! folder; the test writes it there), runs every attempt in it, writes one JSON line per attempt
//! to [`RESULTS_FILE`] in the same directory (complete when it appears: written to a temp name
//! and renamed), and then serves as the fake OpenCode
//! ([`codemantle_tests::fake_opencode::serve`]) so the session starts normally.
//!
//! Plan lines: `<op> <target>`, one attempt each; `#` starts a comment. A target starting
//! with `$HOME/` is beneath the session's private HOME (the results keep the unexpanded text).
//!
//! | op | attempt |
//! |---|---|
//! | `read <path>` | read the whole file |
//! | `write <path>` | create/truncate it and write one line |
//! | `exec <path>` | run it (no arguments) and wait |
//! | `connect <port>` | TCP connect to 127.0.0.1:port (5 s timeout) |
//! | `bind <port>` | TCP listen on 127.0.0.1:port |
//! | `signal0 <pid or self>` | `kill(pid, 0)` |
//! | `sigterm <pid>` | `kill(pid, SIGTERM)` |
//!
//! Result lines: `{"op", "target", "ok", "errno", "error"}`; `errno` is the OS error number of a
//! failure (`EACCES` for a landlock denial of files, exec, bind and connect; `EPERM` for a
//! signal out of the sandbox's scope), `null` on success.
//!
//! SAFETY: what it touches is what the plan names, and the plan is written by the test, which
//! names only its own temp dirs, its own loopback listeners and processes, and read-only
//! attempts on system files. Everything it does runs inside the sandbox under test.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use serde_json::json;

/// The plan, in the working directory.
const PLAN_FILE: &str = "escape-plan.txt";
/// The results, in the working directory (JSON lines).
const RESULTS_FILE: &str = "escape-results.jsonl";

fn attempt(op: &str, target: &str) -> std::io::Result<()> {
    let port = || {
        target
            .parse::<u16>()
            .map_err(|_| std::io::Error::other(format!("{target:?} is not a port")))
    };
    let pid = || -> std::io::Result<libc::pid_t> {
        if target == "self" {
            return Ok(libc::pid_t::try_from(std::process::id()).unwrap_or(0));
        }
        target
            .parse::<libc::pid_t>()
            .map_err(|_| std::io::Error::other(format!("{target:?} is not a pid")))
    };
    let signal = |sig: libc::c_int| -> std::io::Result<()> {
        let pid = pid()?;
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { libc::kill(pid, sig) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    match op {
        "read" => std::fs::read(target).map(drop),
        "write" => std::fs::write(target, "written by cm-escape-probe\n"),
        "exec" => std::process::Command::new(target)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .and_then(|s| {
                if s.success() {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "{target} ran and failed: {s}"
                    )))
                }
            }),
        "connect" => TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port()?)),
            Duration::from_secs(5),
        )
        .map(drop),
        "bind" => TcpListener::bind(("127.0.0.1", port()?)).map(drop),
        "signal0" => signal(0),
        "sigterm" => signal(libc::SIGTERM),
        other => Err(std::io::Error::other(format!("unknown op {other:?}"))),
    }
}

fn run_plan() -> std::io::Result<()> {
    let plan = std::fs::read_to_string(PLAN_FILE)?;
    let mut out = String::new();
    for line in plan.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (op, target) = line.split_once(' ').unwrap_or((line, ""));
        let target = target.trim();
        // `$HOME/...`: beneath the private HOME the daemon gave this session.
        let expanded = match target.strip_prefix("$HOME/") {
            Some(rest) => format!("{}/{rest}", std::env::var("HOME").unwrap_or_default()),
            None => target.to_owned(),
        };
        let (ok, errno, error) = match attempt(op, &expanded) {
            Ok(()) => (true, None, None),
            Err(e) => (false, e.raw_os_error(), Some(e.to_string())),
        };
        let record = json!({"op": op, "target": target, "ok": ok, "errno": errno, "error": error});
        out.push_str(&record.to_string());
        out.push('\n');
    }
    let tmp = format!("{RESULTS_FILE}.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(out.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, RESULTS_FILE)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.parse::<u16>().ok());
    let Some(port) = port else {
        eprintln!("usage: cm-escape-probe serve [--hostname 127.0.0.1] --port <port>");
        std::process::exit(2);
    };
    if let Err(e) = run_plan() {
        eprintln!("cm-escape-probe: plan {PLAN_FILE} not run: {e}");
    }
    let password = std::env::var("OPENCODE_SERVER_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty());
    codemantle_tests::fake_opencode::serve(port, password)
}
