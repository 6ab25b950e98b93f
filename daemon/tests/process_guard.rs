//! The process guard against real processes in a real landlock sandbox. Every escape attempt
//! is made by a real child (the probe: this test binary re-executed inside the sandbox; see
//! `process_guard_support`). Runs as root in CI and here; tests that need root say so and
//! are skipped otherwise.
//!
//! SAFETY: see the support module — writes only inside each test's temp dir.

mod process_guard_support;

use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::time::{Duration, Instant};

use codemantle_daemon::guard::path::RelPath;
use codemantle_daemon::guard::process::{
    ChildStep, Exit, FsProtection, GroupSignal, KillGroupError, NetProtection, ProcessError,
    ProcessGuard, ProcessId, landlock_support, procfs,
};
use nix::sys::signal::Signal;
use process_guard_support::{
    EACCES, EPERM, NOBODY, PROBE, World, chmod, chown_child_user, probe_main, read_results,
    running_as_root, test_config,
};

#[test]
fn probe_entry() {
    probe_main();
}

fn ops(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn refuses_what_is_not_allowed_before_starting_anything() {
    let w = World::new();
    let e = w.guard.spawn(w.spec("bash")).unwrap_err();
    assert!(matches!(e, ProcessError::NotAllowed { .. }), "{e}");
    assert!(e.to_string().contains("[process.allowlist]"), "{e}");
    // A path is not a name.
    let e = w.guard.spawn(w.spec("/bin/true")).unwrap_err();
    assert!(matches!(e, ProcessError::NotAllowed { .. }), "{e}");

    let mut spec = w.spec("true");
    spec.args = vec!["ok".into(), "bad\0arg".into()];
    let e = w.guard.spawn(spec).unwrap_err();
    assert!(matches!(e, ProcessError::NulInArgument { index: 1 }), "{e}");

    for name in [
        "CODEMANTLE_DEVICE_KEY",
        "LD_PRELOAD",
        "PATH",
        "HOME",
        "A=B",
        "",
    ] {
        let mut spec = w.spec("true");
        spec.extra_env = vec![(name.to_owned(), "x".into())];
        let e = w.guard.spawn(spec).unwrap_err();
        assert!(
            matches!(e, ProcessError::ForbiddenEnv { .. }),
            "{name}: {e}"
        );
    }
    let mut spec = w.spec("true");
    spec.extra_env = vec![("OK_NAME".to_owned(), "a\0b".into())];
    assert!(matches!(
        w.guard.spawn(spec),
        Err(ProcessError::NulInEnv { .. })
    ));
}

#[test]
fn protection_report_on_this_kernel() {
    let w = World::new();
    let mut child = w.guard.spawn(w.spec("true")).unwrap();
    assert_eq!(child.wait().unwrap(), Exit::Code(0));
    let p = &child.protection;
    let abi = landlock_support().abi().expect("landlock on this kernel");
    eprintln!("landlock ABI {abi}; report: {p}");
    assert_eq!(p.landlock_abi, Some(abi));
    assert_eq!(p.fs, FsProtection::Full);
    assert_eq!(p.net, NetProtection::Enforced);
    assert_eq!(p.scoped, abi >= 6);
    assert!(p.no_new_privs);
    assert_eq!(p.short(), format!("landlock-v{abi}:fs+net+scope"));
    if running_as_root() {
        assert_eq!(p.user, format!("{NOBODY}:{NOBODY}"));
        assert!(p.user_dropped);
    }
}

#[test]
fn filesystem_confinement() {
    let w = World::new();
    // Another session's home: the same uid owns it, so only landlock keeps us out.
    let other = w.guard.private_dirs("session-b").unwrap();
    let other_file = other.home.join("notes");
    std::fs::write(&other_file, b"session b").unwrap();
    chown_child_user(&other_file);
    let secret = w.outside.join("secret");
    let victim = w.outside.join("victim");
    let p = |rel: &str| w.project.join(rel).display().to_string();
    let list = vec![
        format!("read {}", secret.display()),
        "read /etc/hostname".to_owned(),
        "read /etc/shadow".to_owned(),
        "read /root/.bashrc".to_owned(),
        format!("write {}", victim.display()),
        format!("write {}", w.outside.join("new-file").display()),
        format!("mkdir {}", w.outside.join("new-dir").display()),
        format!("write {}", p("created.txt")),
        format!("read {}", p("readme.txt")),
        format!("mkdir {}", p("subdir")),
        format!("write {}", w.private.home.join("dotfile").display()),
        format!("write {}", w.private.tmp.join("scratch").display()),
        format!("read {}", other_file.display()),
        format!("write {}", w.private_base.join("planted").display()),
        "read /usr/bin/env".to_owned(),
        "read /etc/passwd".to_owned(),
    ];
    let r = w.probe(&list);
    let expect = [
        EACCES, EACCES, EACCES, EACCES, EACCES, EACCES, EACCES, "ok", "ok", "ok", "ok", "ok",
        EACCES, EACCES, "ok", "ok",
    ];
    for (i, (got, want)) in r.iter().zip(expect).enumerate() {
        assert_eq!(got, want, "op {i}: {}", list[i]);
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"original");
    assert!(!w.outside.join("new-file").exists());
    assert!(!w.outside.join("new-dir").exists());
    assert!(!w.private_base.join("planted").exists());
    assert_eq!(
        std::fs::read(w.project.join("created.txt")).unwrap(),
        b"written by the sandboxed probe"
    );
    assert!(w.project.join("subdir").is_dir());
    if running_as_root() {
        assert_eq!(
            std::fs::metadata(w.project.join("created.txt"))
                .unwrap()
                .uid(),
            NOBODY
        );
    }
}

#[test]
fn planted_binaries_cannot_be_executed() {
    let w = World::new();
    for dir in [&w.project, &w.private.home, &w.private.tmp] {
        let copy = dir.join("true-copy");
        std::fs::copy("/bin/true", &copy).unwrap();
        chmod(&copy, 0o755);
        chown_child_user(&copy);
    }
    let r = w.probe(&ops(&[
        "exec /bin/true",
        &format!("exec {}", w.project.join("true-copy").display()),
        &format!("exec {}", w.private.home.join("true-copy").display()),
        &format!("exec {}", w.private.tmp.join("true-copy").display()),
    ]));
    assert_eq!(r, ["ok", EACCES, EACCES, EACCES]);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn tcp_ports_confined() {
    assert!(
        landlock_support().abi().unwrap() >= 4,
        "needs landlock ABI 4"
    );
    let w = World::with_config(|c| c.connect_ports = Vec::new());
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    let denied_port = denied.local_addr().unwrap().port();
    let session_port = free_port();
    let other_port = free_port();
    let r = w.probe_with(
        &ops(&[
            &format!("connect {allowed_port}"),
            &format!("connect {denied_port}"),
            &format!("bind {session_port}"),
            &format!("bind {other_port}"),
        ]),
        |spec| {
            spec.net.connect_ports = vec![allowed_port];
            spec.net.bind_ports = vec![session_port];
        },
    );
    assert_eq!(r, ["ok", EACCES, "ok", EACCES]);
}

/// A `sleep` started by the test, outside any sandbox; killed on drop.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn start(as_nobody: bool) -> Sleeper {
        let mut cmd = std::process::Command::new("/bin/sleep");
        cmd.arg("60").process_group(0);
        if as_nobody {
            cmd.uid(NOBODY).gid(NOBODY);
        }
        Sleeper(cmd.spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cannot_signal_the_daemon_or_processes_outside_the_sandbox() {
    if !running_as_root() {
        eprintln!("skipped: needs root (to drop to nobody)");
        return;
    }
    let w = World::new();
    let mut root_sleeper = Sleeper::start(false);
    // Same uid as the sandboxed child: file permissions would allow the signal, only
    // landlock's signal scope (ABI 6) stops it.
    let mut nobody_sleeper = Sleeper::start(true);
    let me = std::process::id();
    let r = w.probe(&ops(&[
        // Signal 0 checks permission without delivering anything (a regression must not be
        // able to kill the test runner).
        &format!("kill {me}:0"),
        &format!("kill {}:15", root_sleeper.pid()),
        &format!("kill {}:15", nobody_sleeper.pid()),
    ]));
    assert_eq!(r[0], EPERM, "signal the daemon");
    assert_eq!(r[1], EPERM, "signal a root process");
    if landlock_support().abi().unwrap() >= 6 {
        assert_eq!(r[2], EPERM, "signal a same-uid process outside the sandbox");
        assert!(nobody_sleeper.alive());
    }
    assert!(root_sleeper.alive());
}

#[test]
fn limits_identity_and_no_new_privs_visible_in_the_child() {
    let w = World::with_config(|c| {
        c.limits.max_address_space_mb = Some(16 * 1024);
        c.limits.max_cpu_seconds = Some(3600);
    });
    let r = w.probe(&ops(&["cat /proc/self/limits", "cat /proc/self/status"]));
    let limits: Vec<&str> = r[0].split('\u{1}').collect();
    let row = |name: &str| -> Vec<String> {
        let line = limits
            .iter()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {limits:?}"));
        line[name.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(row("Max core file size")[..2], ["0", "0"]);
    assert_eq!(row("Max open files")[..2], ["512", "512"]);
    assert_eq!(row("Max processes")[..2], ["2000", "2000"]);
    let bytes = (16u64 << 30).to_string();
    assert_eq!(
        row("Max address space")[..2],
        [bytes.as_str(), bytes.as_str()]
    );
    assert_eq!(row("Max cpu time")[..2], ["3600", "3600"]);
    let status: Vec<&str> = r[1].split('\u{1}').collect();
    let field = |name: &str| -> String {
        status
            .iter()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {status:?}"))
            .trim()
            .to_owned()
    };
    assert_eq!(field("NoNewPrivs:"), "1");
    if running_as_root() {
        let ids = format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}");
        assert_eq!(field("Uid:"), ids);
        assert_eq!(field("Gid:"), ids);
        assert_eq!(field("Groups:"), "");
        assert_eq!(field("CapEff:"), "0000000000000000");
    }
}

#[test]
fn group_kill_ends_grandchildren_and_identity_survives_reaping() {
    let w = World::new();
    let mut child = w
        .spawn_probe(&ops(&["sleepers 3", "sleep 300"]), |_| {})
        .unwrap();
    let id = child.id();
    assert_eq!(child.pgid, child.pid);
    assert!(id.is_alive());
    let r = read_results(&mut child, 1);
    let grandchildren: Vec<ProcessId> = r[0]
        .split(',')
        .map(|p| {
            let pid: i32 = p.parse().unwrap();
            let stat = procfs::read_stat(pid).unwrap();
            assert_eq!(stat.pgrp, child.pid, "grandchild in the session's group");
            ProcessId {
                pid,
                start_time: stat.start_time,
            }
        })
        .collect();
    assert!(grandchildren.iter().all(ProcessId::is_alive));
    let mut members = procfs::group_members(child.pgid);
    members.sort_unstable();
    assert_eq!(members.len(), 4, "{members:?}");

    // A wrong start time is someone else's process: refused, nothing signalled.
    let impostor = ProcessId {
        pid: child.pid,
        start_time: child.start_time + 1,
    };
    assert!(!impostor.is_alive());
    assert!(matches!(
        impostor.signal_group(Signal::SIGKILL),
        Err(KillGroupError::Recycled { .. })
    ));
    assert!(id.is_alive());

    assert_eq!(child.signal_group(Signal::SIGKILL), Ok(GroupSignal::Sent));
    assert_eq!(child.wait().unwrap(), Exit::Signal(libc::SIGKILL));
    let deadline = Instant::now() + Duration::from_secs(10);
    while grandchildren.iter().any(ProcessId::is_alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!grandchildren.iter().any(ProcessId::is_alive));
    assert!(!id.is_alive());
    assert!(procfs::group_members(id.pid).is_empty());
    assert_eq!(
        id.signal_group(Signal::SIGKILL),
        Ok(GroupSignal::AlreadyGone)
    );
    // A re-adopted (not our child) process: wait_exit polls and reports an unknown status.
    assert_eq!(
        smol::block_on(id.wait_exit(Duration::from_millis(10))),
        Exit::Unknown
    );
}

#[test]
fn leader_gone_group_still_signalled() {
    // The leader exits at once; its sleepers keep the group alive. kill_group must still
    // find and end them (the pgid cannot be reused while they exist).
    let w = World::new();
    let mut child = w.spawn_probe(&ops(&["sleepers 2"]), |_| {}).unwrap();
    let id = child.id();
    let r = read_results(&mut child, 1);
    let pids: Vec<i32> = r[0].split(',').map(|p| p.parse().unwrap()).collect();
    child.wait().unwrap();
    assert!(!id.is_alive());
    assert_eq!(procfs::group_members(id.pid).len(), 2);
    assert_eq!(id.signal_group(Signal::SIGKILL), Ok(GroupSignal::Sent));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !procfs::group_members(id.pid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(procfs::group_members(id.pid).is_empty(), "{pids:?}");
}

#[test]
fn a_recycled_pid_is_never_signalled() {
    let mut other = Sleeper::start(false);
    let pid = other.pid() as i32;
    let real = procfs::start_time(pid).unwrap();
    let stale = ProcessId {
        pid,
        start_time: real.saturating_sub(1),
    };
    assert!(!stale.is_alive());
    assert!(matches!(
        stale.signal_group(Signal::SIGKILL),
        Err(KillGroupError::Recycled { .. })
    ));
    assert!(other.alive());
    assert!(
        ProcessId {
            pid,
            start_time: real
        }
        .is_alive()
    );
}

#[test]
fn child_setup_failure_names_the_step() {
    if !running_as_root() {
        eprintln!("skipped: needs root (an unreachable directory for nobody)");
        return;
    }
    let w = World::new();
    let locked = w.project.join("locked");
    std::fs::create_dir(&locked).unwrap();
    chmod(&locked, 0o700); // root-owned: nobody cannot enter
    let fd = w.root.open_dir(&RelPath::parse("locked").unwrap()).unwrap();
    let mut spec = w.spec("true");
    spec.cwd = Some(fd.as_fd());
    let e = w.guard.spawn(spec).unwrap_err();
    match &e {
        ProcessError::ChildSetup { step, errno, .. } => {
            assert_eq!(*step, ChildStep::Chdir);
            assert_eq!(*errno, nix::errno::Errno::EACCES);
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("chown"), "{e}");
}

#[test]
fn cwd_defaults_to_the_project_and_can_be_a_subdirectory() {
    let w = World::new();
    std::fs::create_dir(w.project.join("sub")).unwrap();
    chown_child_user(&w.project.join("sub"));
    let r = w.probe(&ops(&["write relative.txt"]));
    assert_eq!(r, ["ok"]);
    assert!(w.project.join("relative.txt").exists());
    let fd = w.root.open_dir(&RelPath::parse("sub").unwrap()).unwrap();
    let r = w.probe_with(&ops(&["write in-sub.txt"]), |spec| {
        spec.cwd = Some(fd.as_fd())
    });
    assert_eq!(r, ["ok"]);
    assert!(w.project.join("sub/in-sub.txt").exists());
}

#[test]
fn private_dirs_are_checked() {
    let w = World::new();
    let meta = std::fs::symlink_metadata(&w.private.home).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.mode() & 0o7777, 0o700);
    let session = w.private.home.parent().unwrap();
    assert_eq!(std::fs::metadata(session).unwrap().mode() & 0o7777, 0o711);
    if running_as_root() {
        assert_eq!(meta.uid(), NOBODY);
        assert_eq!(std::fs::metadata(session).unwrap().uid(), 0);
    }
    // Reuse is fine.
    assert_eq!(w.guard.private_dirs("session-a").unwrap(), w.private);
    for bad in ["", ".", "..", "a/b", "x y", &"k".repeat(65)] {
        assert!(
            matches!(w.guard.private_dirs(bad), Err(ProcessError::BadKey { .. })),
            "{bad:?}"
        );
    }
    // A symlink where a home should be is refused (it points into the temp dir only).
    let s = w.private_base.join("session-c");
    std::fs::create_dir(&s).unwrap();
    chmod(&s, 0o711);
    std::os::unix::fs::symlink(&w.outside, s.join("home")).unwrap();
    let e = w.guard.private_dirs("session-c").unwrap_err();
    assert!(e.to_string().contains("not a symlink"), "{e}");
}

#[test]
fn a_root_daemon_needs_a_run_as_user() {
    if !running_as_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(tmp.path());
    config.run_as = None;
    assert!(matches!(
        ProcessGuard::new(&config),
        Err(ProcessError::WouldRunAsRoot)
    ));
}

#[test]
fn outputs_are_piped_and_exit_codes_reported() {
    let w = World::new();
    let mut child = w.guard.spawn(w.spec(PROBE)).unwrap();
    // Without CM_PROBE the probe is an ordinary passing test run.
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(child.wait().unwrap(), Exit::Code(0), "{out}");
    let child = w.guard.spawn(w.spec("true")).unwrap();
    assert_eq!(smol::block_on(child.wait_exit()).unwrap(), Exit::Code(0));
}
