//! The escape suite, run inside a real sandboxed session: the real control plane starts a
//! session on the real daemon, whose allowlisted `opencode` is `cm-escape-probe`; the daemon
//! starts it through the process guard exactly as it starts OpenCode (as `nobody` when the
//! tests run as root, landlock, rlimits, no-new-privs, the session's port). At start the probe
//! runs the attempts this test wrote into the project folder and writes each result (errno)
//! back there; then it serves as the fake OpenCode, so the session comes up normally.
//!
//! Denied (each must fail with the errno of the layer that is supposed to stop it):
//! - read a file outside the project that every user may read (so only landlock stands in the
//!   way), `/etc/shadow`, a world-readable `/etc` file not on the sandbox's list, and the
//!   daemon's own config;
//! - write into a world-writable directory outside the project (the file must not appear);
//! - exec a program outside the allowlist and the system directories, and a program dropped
//!   into the project (the project is writable, never executable);
//! - connect to a loopback port that is not in `process.connect_ports` (the test listens there
//!   and asserts nothing connected), and to the control plane's API port;
//! - bind a port other than the session's;
//! - signal the daemon (`kill(pid, 0)` and `SIGTERM`; the daemon must live on), and signal a
//!   process of the session's own user that is outside the sandbox (landlock's signal scope:
//!   the user's rights alone would allow it), and read that process's `/proc/<pid>/environ`.
//!
//! Allowed, as controls, so the test can fail: read and write inside the project, read
//! `/etc/passwd` and its own `/proc/self/environ`, run a system program (`true`), connect to
//! the allowed port (the listener sees the connection), signal itself.
//!
//! Every session process is also checked in `/proc`: it runs as `nobody` (when the tests run
//! as root) with no supplementary groups, with no-new-privs set and core dumps off.
//!
//! A second test runs two sessions (folders `a` and `b`) on one daemon, both as the same
//! user: `b` cannot read or write `a`'s project or private HOME, connect to `a`'s OpenCode
//! port, or signal `a`'s process — only the per-session sandbox separates them.
//!
//! SAFETY RULES (these tests run as root on a shared machine):
//! - every file is inside the test's own temp dirs; `/etc` files are only ever **read**
//!   (attempts from inside the sandbox, as `nobody`);
//! - the network is 127.0.0.1 only; the signals go to the test's own daemon and its own
//!   `sleep` process (both killed at the end), and the sandbox must stop them.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use codemantle_tests::bins::bin_path;
use codemantle_tests::harness::{ControlPlane, Daemon, free_port, wait_until};
use serde_json::{Value, json};

const NOBODY: u32 = 65534;

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A system copy of `true` (a program the sandbox lets any session run).
fn system_true() -> &'static str {
    ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("no /usr/bin/true or /bin/true")
}

/// A child process killed and reaped on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills (SIGKILL, whole process group) every process whose working directory is under `dir`
/// when dropped: sessions outlive a daemon by design (they are re-adopted after a restart), so
/// a test that fails before stopping its session would otherwise leave OpenCode running.
struct SessionReaper(std::path::PathBuf);

impl Drop for SessionReaper {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            let in_dir = std::fs::read_link(entry.path().join("cwd"))
                .is_ok_and(|cwd| cwd.starts_with(&self.0));
            if in_dir && pid > 1 {
                // SAFETY: kill(2) on a process (group) of this test's own session.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled by us (root
    // or its user).
    unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), 0) == 0 }
}

/// The first of `n` consecutive free ports on 127.0.0.1.
fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let first = free_port();
        if first.checked_add(n).is_none() {
            continue;
        }
        let all_free = (first..first + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return first;
        }
    }
    panic!("no {n} consecutive free ports on 127.0.0.1");
}

/// `[process]` + `[session]`: the probe as `opencode`, connect allowed only to `allowed_port`,
/// `ports` session ports.
fn probe_config(dir: &Path, allowed_port: u16, ports: u16) -> String {
    chmod(dir, 0o711);
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    chmod(&bin_dir, 0o755);
    let probe = bin_dir.join("cm-escape-probe");
    std::fs::copy(bin_path("cm-escape-probe"), &probe).unwrap();
    chmod(&probe, 0o755);
    let project = dir.join("project");
    let run_as = if running_as_root() {
        std::os::unix::fs::lchown(&project, Some(NOBODY), Some(NOBODY)).unwrap();
        "run_as = \"nobody\"\n"
    } else {
        ""
    };
    let first = free_ports(ports);
    let last = first + ports - 1;
    format!(
        "[process]\n{run_as}private_dir = {private:?}\nconnect_ports = [{allowed_port}]\n\
         [process.allowlist]\nopencode = {probe:?}\n\
         [session]\nport_range = \"{first}-{last}\"\nstart_timeout_s = 60\n",
        private = dir.join("private").display().to_string(),
        probe = probe.display().to_string(),
    )
}

/// What one attempt should give: allowed, or denied with this errno.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Allowed,
    Denied(i32),
}

/// Reads the probe's results from `folder` and asserts each attempt of `plan` came out as
/// expected (all mismatches in one message).
fn check_results(folder: &Path, plan: &[(&str, String, Expect)]) {
    let results_path = folder.join("escape-results.jsonl");
    wait_until(Duration::from_secs(30), "the probe's results", || {
        results_path.is_file()
    });
    let results: HashMap<(String, String), Value> = std::fs::read_to_string(&results_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("result json"))
        .map(|v| {
            let key = (
                v["op"].as_str().unwrap().to_owned(),
                v["target"].as_str().unwrap().to_owned(),
            );
            (key, v)
        })
        .collect();

    let mut wrong = Vec::new();
    for (op, target, expect) in plan {
        let got = results
            .get(&((*op).to_owned(), target.clone()))
            .unwrap_or_else(|| panic!("no result for {op} {target}: {results:?}"));
        let actual = if got["ok"] == json!(true) {
            Expect::Allowed
        } else {
            Expect::Denied(i32::try_from(got["errno"].as_i64().unwrap_or(-1)).unwrap())
        };
        eprintln!(
            "{op:8} {target:60} expected {expect:?}, got {actual:?} {}",
            got["error"]
        );
        if actual != *expect {
            wrong.push(format!("{op} {target}: expected {expect:?}, got {got}"));
        }
    }
    assert!(wrong.is_empty(), "sandbox results:\n{}", wrong.join("\n"));
}

#[test]
fn a_sandboxed_session_cannot_escape_and_can_do_its_work() {
    // Outside the project: a world-readable secret, a world-writable drop directory, a
    // world-executable program — so only the sandbox, not file permissions, can stop the probe.
    let outside = tempfile::tempdir().unwrap();
    chmod(outside.path(), 0o755);
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "outside the project\n").unwrap();
    chmod(&secret, 0o644);
    let drop_dir = outside.path().join("drop");
    std::fs::create_dir(&drop_dir).unwrap();
    chmod(&drop_dir, 0o777);
    let escaped = drop_dir.join("escaped.txt");
    let outside_prog = outside.path().join("prog");
    std::fs::copy(system_true(), &outside_prog).unwrap();
    chmod(&outside_prog, 0o755);

    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    allowed.set_nonblocking(true).unwrap();
    let denied = TcpListener::bind("127.0.0.1:0").unwrap();
    let denied_port = denied.local_addr().unwrap().port();
    denied.set_nonblocking(true).unwrap();
    let bind_port = free_port();

    // A process of the session's user outside the sandbox (only when we can make one).
    let outsider = running_as_root().then(|| {
        KillOnDrop(
            Command::new("sleep")
                .arg("600")
                .uid(NOBODY)
                .gid(NOBODY)
                .stdin(Stdio::null())
                .spawn()
                .expect("start sleep as nobody"),
        )
    });

    let mut cp = ControlPlane::start();
    let creds = cp.add_device("escape");
    let daemon = Daemon::start_with(&cp.ws_url(), &creds, |dir| {
        probe_config(dir, allowed_port, 1)
    });
    cp.wait_online(&creds.id);
    let _reaper = SessionReaper(daemon.dir.path().to_path_buf());
    let daemon_pid = daemon.pid().expect("daemon pid");
    let project = daemon.root.clone();
    let inside = project.join("inside.txt");
    std::fs::write(&inside, "inside the project\n").unwrap();
    chmod(&inside, 0o644);
    let dropped_prog = project.join("dropped-prog");
    std::fs::copy(system_true(), &dropped_prog).unwrap();
    chmod(&dropped_prog, 0o755);
    let wrote = project.join("probe-wrote.txt");

    let eacces = Expect::Denied(libc::EACCES);
    let eperm = Expect::Denied(libc::EPERM);
    let mut plan: Vec<(&str, String, Expect)> = vec![
        ("read", secret.display().to_string(), eacces),
        ("read", "/etc/shadow".to_owned(), eacces),
        (
            "read",
            daemon.dir.path().join("daemon.toml").display().to_string(),
            eacces,
        ),
        ("write", escaped.display().to_string(), eacces),
        ("exec", outside_prog.display().to_string(), eacces),
        ("exec", dropped_prog.display().to_string(), eacces),
        ("connect", denied_port.to_string(), eacces),
        ("connect", cp.port.to_string(), eacces),
        ("bind", bind_port.to_string(), eacces),
        ("signal0", daemon_pid.to_string(), eperm),
        ("sigterm", daemon_pid.to_string(), eperm),
        // Controls.
        ("read", inside.display().to_string(), Expect::Allowed),
        ("read", "/etc/passwd".to_owned(), Expect::Allowed),
        ("write", wrote.display().to_string(), Expect::Allowed),
        ("exec", system_true().to_owned(), Expect::Allowed),
        ("connect", allowed_port.to_string(), Expect::Allowed),
        ("signal0", "self".to_owned(), Expect::Allowed),
        ("read", "/proc/self/environ".to_owned(), Expect::Allowed),
    ];
    // A world-readable /etc file that is not on the sandbox's list.
    if let Some(etc) = ["/etc/hostname", "/etc/debian_version", "/etc/machine-id"]
        .into_iter()
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o004 != 0)
        })
    {
        plan.push(("read", etc.to_owned(), eacces));
    }
    if let Some(o) = &outsider {
        plan.push(("signal0", o.0.id().to_string(), eperm));
        plan.push(("sigterm", o.0.id().to_string(), eperm));
        // Its environment (ptrace-mode read, which landlock denies across the sandbox's edge;
        // the same user outside a sandbox could read it).
        plan.push(("read", format!("/proc/{}/environ", o.0.id()), eacces));
    }
    let plan_text: String = plan
        .iter()
        .map(|(op, target, _)| format!("{op} {target}\n"))
        .collect();
    std::fs::write(project.join("escape-plan.txt"), plan_text).unwrap();

    // The session: the probe runs its plan before it serves, so when the start succeeded the
    // results are there.
    let (status, body) = cp.post(
        &format!("/devices/{}/session/start", creds.id),
        json!({ "path": "." }),
    );
    assert_eq!(status, 200, "session/start: {body}\n{}", daemon.log());
    assert_eq!(
        body["o"],
        json!(1),
        "session/start: {body}\n{}",
        daemon.log()
    );
    let sid = body["s"].as_str().expect("session id").to_owned();
    let (_, sv) = cp.post(
        &format!("/devices/{}/session/status", creds.id),
        json!({ "path": "." }),
    );
    assert_guarded(u32::try_from(sv["d"].as_u64().expect("pid")).unwrap());
    let log = daemon.log();
    let start_line = log
        .lines()
        .find(|l| l.contains("opencode started"))
        .unwrap_or_else(|| panic!("no start line:\n{log}"));
    assert!(
        start_line.contains("protection=landlock") && start_line.contains("fs+net+scope"),
        "the session runs with landlock fs, net and scope: {start_line}"
    );
    check_results(&project, &plan);

    // What the attempts did (or did not do) outside the probe.
    assert!(!escaped.exists(), "nothing was written outside the project");
    assert_eq!(
        std::fs::read_to_string(&wrote).unwrap(),
        "written by cm-escape-probe\n"
    );
    match denied.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the denied port must see no connection, got {other:?}"),
    }
    allowed.set_nonblocking(false).unwrap();
    let (_conn, from) = allowed.accept().expect("the allowed port saw the probe");
    assert!(from.ip().is_loopback());
    assert!(alive(daemon_pid), "the daemon survived the SIGTERM attempt");
    if let Some(o) = &outsider {
        assert!(
            alive(o.0.id()),
            "the outside process survived the SIGTERM attempt"
        );
    }
    // The daemon still works: stop the session through it.
    let (status, body) = cp.post(
        &format!("/devices/{}/session/terminate", creds.id),
        json!({ "sessionId": sid }),
    );
    assert_eq!(status, 200, "terminate: {body}");
    assert_eq!(body["o"], json!(1), "terminate: {body}\n{}", daemon.log());
}

/// Starts a session for `folder` and returns (session id, OpenCode pid, port).
fn start_session(
    cp: &ControlPlane,
    daemon: &Daemon,
    device: &str,
    folder: &str,
) -> (String, u32, u16) {
    let (status, body) = cp.post(
        &format!("/devices/{device}/session/start"),
        json!({ "path": folder }),
    );
    assert_eq!(
        status,
        200,
        "session/start {folder}: {body}\n{}",
        daemon.log()
    );
    assert_eq!(
        body["o"],
        json!(1),
        "session/start {folder}: {body}\n{}",
        daemon.log()
    );
    let sid = body["s"].as_str().expect("session id").to_owned();
    let (status, sv) = cp.post(
        &format!("/devices/{device}/session/status"),
        json!({ "path": folder }),
    );
    assert_eq!(status, 200, "{sv}");
    assert_eq!(sv["o"], json!(1), "{folder} running: {sv}");
    let pid = u32::try_from(sv["d"].as_u64().expect("pid")).unwrap();
    let port = u16::try_from(sv["p"].as_u64().expect("port")).unwrap();
    assert_guarded(pid);
    (sid, pid, port)
}

/// The process guard's marks on a session process, read from `/proc`: the unprivileged user
/// (when the tests run as root), no-new-privs, no core dumps.
fn assert_guarded(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    if running_as_root() {
        assert_eq!(field("Uid:"), vec!["65534"; 4], "runs as nobody");
        assert_eq!(field("Gid:"), vec!["65534"; 4], "runs as nobody's group");
        assert_eq!(
            field("Groups:"),
            Vec::<&str>::new(),
            "no supplementary groups"
        );
    }
    assert_eq!(field("NoNewPrivs:"), vec!["1"], "PR_SET_NO_NEW_PRIVS");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit");
    assert_eq!(
        core.split_whitespace().nth(4),
        Some("0"),
        "core dumps off: {core}"
    );
}

#[test]
fn one_session_cannot_reach_another_sessions_files_server_or_process() {
    // Two sessions of the same daemon run as the same user (`nobody`), so file permissions
    // and signal rules let them reach each other: only the per-session sandbox keeps folder
    // `b`'s agent out of folder `a`'s project, private HOME, OpenCode server and process.
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    let mut cp = ControlPlane::start();
    let creds = cp.add_device("escape-two");
    let daemon = Daemon::start_with(&cp.ws_url(), &creds, |dir| {
        probe_config(dir, allowed_port, 2)
    });
    cp.wait_online(&creds.id);
    let _reaper = SessionReaper(daemon.dir.path().to_path_buf());
    let device = creds.id.clone();
    let root = daemon.root.clone();
    for folder in ["a", "b"] {
        let dir = root.join(folder);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("inside.txt"), format!("inside {folder}\n")).unwrap();
        if running_as_root() {
            std::os::unix::fs::lchown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
        }
    }

    let (sid_a, pid_a, port_a) = start_session(&cp, &daemon, &device, "a");
    // Session a's private HOME (the only one so far), with a file only its user may read.
    let private: Vec<_> = std::fs::read_dir(daemon.dir.path().join("private"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(private.len(), 1, "one private dir per folder: {private:?}");
    let home_a = private[0].join("home");
    let secret_a = home_a.join("secret.txt");
    std::fs::write(&secret_a, "session a's own\n").unwrap();
    chmod(&secret_a, 0o600);
    if running_as_root() {
        std::os::unix::fs::lchown(&secret_a, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let planted_project = root.join("a/planted.txt");
    let planted_home = home_a.join("planted.txt");

    let eacces = Expect::Denied(libc::EACCES);
    let eperm = Expect::Denied(libc::EPERM);
    let plan: Vec<(&str, String, Expect)> = vec![
        (
            "read",
            root.join("a/inside.txt").display().to_string(),
            eacces,
        ),
        ("write", planted_project.display().to_string(), eacces),
        ("read", secret_a.display().to_string(), eacces),
        ("write", planted_home.display().to_string(), eacces),
        ("connect", port_a.to_string(), eacces),
        ("signal0", pid_a.to_string(), eperm),
        ("sigterm", pid_a.to_string(), eperm),
        // Controls: its own folder and its own HOME.
        (
            "read",
            root.join("b/inside.txt").display().to_string(),
            Expect::Allowed,
        ),
        (
            "write",
            root.join("b/own.txt").display().to_string(),
            Expect::Allowed,
        ),
        ("write", "$HOME/own.txt".to_owned(), Expect::Allowed),
    ];
    let plan_text: String = plan
        .iter()
        .map(|(op, target, _)| format!("{op} {target}\n"))
        .collect();
    std::fs::write(root.join("b/escape-plan.txt"), plan_text).unwrap();

    let (sid_b, _pid_b, _port_b) = start_session(&cp, &daemon, &device, "b");
    check_results(&root.join("b"), &plan);
    assert!(
        !planted_project.exists(),
        "nothing written into a's project"
    );
    assert!(!planted_home.exists(), "nothing written into a's HOME");
    assert!(alive(pid_a), "a's OpenCode survived b's SIGTERM attempt");
    let (_, sv) = cp.post(
        &format!("/devices/{device}/session/status"),
        json!({ "path": "a" }),
    );
    assert_eq!(sv["o"], json!(1), "a still running: {sv}");
    for sid in [sid_a, sid_b] {
        let (status, body) = cp.post(
            &format!("/devices/{device}/session/terminate"),
            json!({ "sessionId": sid }),
        );
        assert_eq!(status, 200, "terminate: {body}");
        assert_eq!(body["o"], json!(1), "terminate: {body}\n{}", daemon.log());
    }
}
