//! Shared fixture for the process-guard tests: a real `ProcessGuard`, a temp dir laid out as
//! project / outside / private, and a **probe**: this very test binary, re-executed inside the
//! sandbox, which performs the operations named in `CM_PROBE` and prints one result line per
//! operation. No helper binary is shipped; the probe exists only in test executables.
//!
//! SAFETY RULES (these tests run as root): every file a probe writes, and every file a test
//! creates or changes, is inside the fixture's temp dir. "Outside" targets are files in
//! `tmp/outside`, never real system files; real system files are only *read* (to show a read
//! is denied). No symlink here points at a real system path.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use codemantle_daemon::config::ProcessConfig;
use codemantle_daemon::guard::path::RootDir;
use codemantle_daemon::guard::process::{
    AllowedProgram, GuardedChild, NetPolicy, PrivateDirs, ProcessError, ProcessGuard, RunAs,
    SpawnSpec,
};

/// The unprivileged user the tests drop to when they run as root.
pub const NOBODY: u32 = 65534;

/// The probe's name in the test allowlist.
pub const PROBE: &str = "probe";

pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Operations the probe understands; run inside the sandbox by [`probe_main`].
fn probe_op(op: &str, arg: &str) -> String {
    fn res<T>(r: std::io::Result<T>) -> String {
        match r {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("err {}", e.raw_os_error().unwrap_or(-1)),
        }
    }
    match op {
        "read" => res(std::fs::read(arg)),
        "write" => res(std::fs::write(arg, b"written by the sandboxed probe")),
        "mkdir" => res(std::fs::create_dir(arg)),
        "exec" => res(std::process::Command::new(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()),
        "connect" => res(std::net::TcpStream::connect((
            "127.0.0.1",
            arg.parse::<u16>().unwrap(),
        ))),
        "bind" => res(std::net::TcpListener::bind((
            "127.0.0.1",
            arg.parse::<u16>().unwrap(),
        ))),
        "kill" => {
            let (pid, sig) = arg.split_once(':').unwrap();
            // SAFETY: kill(2) with numbers.
            let r = unsafe { libc::kill(pid.parse().unwrap(), sig.parse().unwrap()) };
            if r == 0 {
                "ok".to_owned()
            } else {
                res::<()>(Err(std::io::Error::last_os_error()))
            }
        }
        "env" => {
            let mut vars: Vec<String> = std::env::vars_os()
                .filter(|(k, _)| k != "CM_PROBE")
                .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
                .collect();
            vars.sort();
            vars.join("\u{1}")
        }
        "cat" => match std::fs::read_to_string(arg) {
            Ok(t) => t.replace('\n', "\u{1}"),
            Err(e) => format!("err {}", e.raw_os_error().unwrap_or(-1)),
        },
        "sleepers" => {
            let n: usize = arg.parse().unwrap();
            let mut pids = Vec::new();
            for _ in 0..n {
                let c = std::process::Command::new("/bin/sleep")
                    .arg("300")
                    .spawn()
                    .unwrap();
                pids.push(c.id().to_string());
                std::mem::forget(c);
            }
            pids.join(",")
        }
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_secs(arg.parse().unwrap()));
            "ok".to_owned()
        }
        other => format!("unknown op {other}"),
    }
}

/// The probe's entry point: a test that does nothing unless `CM_PROBE` is set. Each test file
/// that uses the probe has `#[test] fn probe_entry() { support::probe_main() }`.
pub fn probe_main() {
    let Some(script) = std::env::var_os("CM_PROBE") else {
        return;
    };
    let script = script.into_string().unwrap();
    use std::io::Write as _;
    let mut out = std::io::stdout();
    for (i, step) in script.split(';').enumerate() {
        let (op, arg) = step.split_once(' ').unwrap_or((step, ""));
        let result = probe_op(op, arg);
        writeln!(out, "PROBE {i} {result}").unwrap();
        out.flush().unwrap();
    }
}

/// A temp-dir world for one test.
pub struct World {
    pub tmp: tempfile::TempDir,
    /// `tmp/project`: the session's project, owned by the child's user.
    pub project: PathBuf,
    /// `tmp/outside`: world-readable and world-writable files the sandbox must not touch.
    pub outside: PathBuf,
    /// `tmp/private`: `process.private_dir`.
    pub private_base: PathBuf,
    pub root: RootDir,
    pub guard: ProcessGuard,
    pub private: PrivateDirs,
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn chown_child_user(path: &Path) {
    if running_as_root() {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(NOBODY)),
            Some(nix::unistd::Gid::from_raw(NOBODY)),
        )
        .unwrap();
    }
}

/// The probe's allowlist entry: this test executable, told to run only `probe_entry`.
pub fn probe_program() -> AllowedProgram {
    AllowedProgram {
        path: std::env::current_exe().unwrap(),
        args: [
            "probe_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ]
        .into_iter()
        .map(OsString::from)
        .collect(),
    }
}

/// A config for tests: the probe and /bin/true allowlisted, `nobody` when root.
pub fn test_config(private_base: &Path) -> ProcessConfig {
    let mut config = ProcessConfig {
        private_dir: private_base.to_owned(),
        run_as: running_as_root().then_some(RunAs {
            uid: NOBODY,
            gid: NOBODY,
            name: Some("nobody".to_owned()),
        }),
        connect_ports: Vec::new(),
        ..ProcessConfig::default()
    };
    config.limits.max_open_files = 512;
    config.limits.max_processes = 2000;
    config.allowlist.insert(PROBE.to_owned(), probe_program());
    config.allowlist.insert(
        "true".to_owned(),
        AllowedProgram {
            path: PathBuf::from("/bin/true"),
            args: Vec::new(),
        },
    );
    config
}

impl World {
    pub fn new() -> World {
        World::with_config(|_| {})
    }

    pub fn with_config(tweak: impl FnOnce(&mut ProcessConfig)) -> World {
        let tmp = tempfile::tempdir().unwrap();
        // The child's user must be able to pass through the temp dir.
        chmod(tmp.path(), 0o755);
        let project = tmp.path().join("project");
        let outside = tmp.path().join("outside");
        let private_base = tmp.path().join("private");
        std::fs::create_dir(&project).unwrap();
        std::fs::create_dir(&outside).unwrap();
        chmod(&project, 0o755);
        chown_child_user(&project);
        chmod(&outside, 0o777);
        std::fs::write(project.join("readme.txt"), b"project file").unwrap();
        chmod(&project.join("readme.txt"), 0o644);
        std::fs::write(outside.join("secret"), b"outside secret").unwrap();
        chmod(&outside.join("secret"), 0o644);
        std::fs::write(outside.join("victim"), b"original").unwrap();
        // World-writable: only the sandbox, not file permissions, keeps the child out.
        chmod(&outside.join("victim"), 0o666);
        let mut config = test_config(&private_base);
        tweak(&mut config);
        let guard = ProcessGuard::new(&config).expect("guard");
        let private = guard.private_dirs("session-a").expect("private dirs");
        let root = RootDir::open("cwd", &project).unwrap();
        World {
            tmp,
            project,
            outside,
            private_base,
            root,
            guard,
            private,
        }
    }

    pub fn spec<'a>(&'a self, program: &'a str) -> SpawnSpec<'a> {
        SpawnSpec {
            program,
            args: Vec::new(),
            project_dir: self.root.as_fd(),
            cwd: None,
            private: &self.private,
            extra_env: Vec::new(),
            net: NetPolicy::default(),
        }
    }

    /// Run the probe with `ops` (`"read /x"`, ...) and return one result per op.
    pub fn probe(&self, ops: &[String]) -> Vec<String> {
        self.probe_with(ops, |_| {})
    }

    pub fn probe_with<'a>(
        &'a self,
        ops: &[String],
        tweak: impl FnOnce(&mut SpawnSpec<'a>),
    ) -> Vec<String> {
        let mut child = self.spawn_probe(ops, tweak).expect("spawn probe");
        let results = read_results(&mut child, ops.len());
        child.wait().unwrap();
        results
    }

    pub fn spawn_probe<'a>(
        &'a self,
        ops: &[String],
        tweak: impl FnOnce(&mut SpawnSpec<'a>),
    ) -> Result<GuardedChild, ProcessError> {
        let mut spec = self.spec(PROBE);
        spec.extra_env
            .push(("CM_PROBE".to_owned(), ops.join(";").into()));
        tweak(&mut spec);
        self.guard.spawn(spec)
    }
}

/// Read `n` `PROBE i result` lines from the child's stdout (stderr is shown on failure).
pub fn read_results(child: &mut GuardedChild, n: usize) -> Vec<String> {
    let stdout = child.stdout.take().unwrap();
    let mut results = Vec::new();
    let mut all = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        all.push_str(&line);
        all.push('\n');
        if let Some(rest) = line.strip_prefix("PROBE ") {
            let (i, result) = rest.split_once(' ').unwrap();
            assert_eq!(i.parse::<usize>().unwrap(), results.len());
            results.push(result.to_owned());
            if results.len() == n {
                break;
            }
        }
    }
    if results.len() != n {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        panic!(
            "probe gave {} of {n} results\nstdout:\n{all}\nstderr:\n{err}",
            results.len()
        );
    }
    results
}

pub const EACCES: &str = "err 13";
pub const EPERM: &str = "err 1";
