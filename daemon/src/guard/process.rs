//! `guard::process`: the only way the daemon starts a process (OpenCode, git).
//!
//! # What 0.1.50 did, and what this does instead
//!
//! 0.1.50 started `OPENCODE_COMMAND` (a name looked up in `PATH`; a shell on Windows) with a
//! full copy of its own environment, auth token included, as its own user, with no limits, and
//! lost track of it after a restart. Here:
//!
//! - **Allowlist by absolute path.** Callers name a program (`"opencode"`, `"git"`); the
//!   operator's config maps the name to an absolute path and an optional fixed argv prefix.
//!   No `PATH` search, no shell. Arguments are an argv vector from the caller (who puts `--`
//!   before anything user-supplied); a NUL in one is refused.
//! - **Own session.** The child calls `setsid`: its pid is its process group and session id,
//!   so [`kill_group`] ends it and everything it started.
//! - **Unprivileged user.** When the daemon is root, the child drops supplementary groups and
//!   switches to `process.run_as` (config refuses root as `run_as`, and refuses a root daemon
//!   with an allowlist but no `run_as`). A non-root daemon cannot switch: children run as the
//!   daemon's user, and [`ProtectionReport::user`] says so.
//! - **Limits.** Core dumps off (they would write memory, secrets included, to disk), open
//!   files and processes capped, address space and CPU time optional.
//! - **Environment from scratch.** Only the variables named in `process.env_pass`, plus `PATH`
//!   (fixed, [`CHILD_PATH`]), `HOME` and `TMPDIR` (the session's private directories), `USER`
//!   and `LOGNAME`, plus what the caller sets ([`SpawnSpec::extra_env`]). Never `CODEMANTLE_*`,
//!   never `LD_*`: config and [`SpawnSpec`] validation refuse those names.
//! - **Landlock** (Linux's unprivileged sandbox; see [`sandbox`] for the exact
//!   grants): read-write only beneath the project directory and the private home and tmp, no
//!   execution there, read + execute on the system directories, a short list of `/etc` files,
//!   nothing else. TCP bind/connect limited to the allowed ports on ABI ≥ 4; signals and
//!   abstract UNIX sockets scoped to the sandbox on ABI ≥ 6. Plus `PR_SET_NO_NEW_PRIVS`.
//! - **Identity that survives restarts.** A process is (pid, start time from
//!   `/proc/PID/stat`); [`is_alive`] and [`kill_group`] never act on a recycled pid.
//!
//! # Older kernels: report, never silently less
//!
//! The ruleset asks for exactly what this kernel's landlock ABI supports. What was obtained is
//! returned with every child as a [`ProtectionReport`] (short form for telemetry:
//! `landlock-v6:fs+net+scope`), and a spawn below `process.min_protection` (default `fs`) is
//! refused with an error that says what the kernel lacks. An operator who accepts less sets
//! `min_protection = "none"` and sees `none` in every report.
//!
//! # Why `pre_exec` and not a helper binary
//!
//! `std::process::Command` does the fork/exec, pipes and exec-error reporting; the guard adds
//! one `pre_exec` closure (the private `child` module) that only makes system calls on values
//! prepared before the fork. Landlock's `restrict_self` applies to the calling thread, so it
//! has to run in the child; building the ruleset (which opens files and allocates) happens in
//! the daemon first.
//!
//! # No `PR_SET_PDEATHSIG`
//!
//! OpenCode sessions must survive a daemon restart or upgrade; the session registry re-adopts
//! them by (pid, start time). A parent-death signal would kill every session whenever the
//! daemon restarts (and, worse, whenever the executor thread that forked exits).
//!
//! # Reaping
//!
//! Our own children are waited for ([`GuardedChild::wait`], or [`GuardedChild::wait_exit`] on
//! a blocking thread). A process re-adopted after a restart is not our child and cannot be
//! waited for: [`ProcessId::wait_exit`] polls its liveness and reports [`Exit::Unknown`].

mod child;
pub mod procfs;
pub mod sandbox;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::Read as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::resource::Resource;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;

pub use self::child::ChildStep;
pub use self::procfs::{GroupSignal, KillGroupError, is_alive};
pub use self::sandbox::{FsProtection, LandlockSupport, NetProtection, landlock_support};
pub use crate::config::process::{
    AllowedProgram, ProcessConfig, ProcessLimits, ProtectionLevel, RunAs,
};

use self::child::{ChildFailure, ChildSetup, MAX_RLIMITS};
use self::sandbox::{BuiltSandbox, SandboxPlan};
use crate::config::process::forbidden_env_name;

/// `PATH` of every child.
pub const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Longest session key accepted by [`ProcessGuard::private_dirs`].
const MAX_KEY_LEN: usize = 64;

/// The best protection this kernel can give (for config checks and startup logs).
pub fn level_offered(support: LandlockSupport) -> ProtectionLevel {
    match support.abi() {
        None => ProtectionLevel::None,
        Some(v) if v >= 4 => ProtectionLevel::FsNet,
        Some(_) => ProtectionLevel::Fs,
    }
}

/// Why a spawn (or the guard itself) was refused or failed. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program name is not in `[process.allowlist]`.
    #[error(
        "`{program}` is not on the process allowlist — add `{program} = \"/absolute/path\"` under [process.allowlist] in the daemon config if the daemon should run it"
    )]
    NotAllowed { program: String },
    /// An argument contains a NUL byte (it would silently cut the argument short).
    #[error("argument {index} contains a NUL byte — arguments cannot contain NUL; fix the caller")]
    NulInArgument { index: usize },
    /// A caller-supplied env variable is not allowed.
    #[error("environment variable {name:?} {why}")]
    ForbiddenEnv { name: String, why: &'static str },
    /// A caller-supplied env value contains NUL.
    #[error("environment variable {name} has a NUL byte in its value")]
    NulInEnv { name: String },
    /// The daemon is root but no `run_as` user is configured.
    #[error(
        "the daemon runs as root and process.run_as is not set: children would run as root — set process.run_as to an unprivileged user"
    )]
    WouldRunAsRoot,
    /// This kernel cannot give `process.min_protection`.
    #[error(
        "refusing to start {program}: the sandbox would be `{obtained}` but process.min_protection is `{required}` ({explain}) — fix the kernel, or lower min_protection knowingly"
    )]
    BelowMinimum {
        program: String,
        obtained: String,
        required: ProtectionLevel,
        explain: &'static str,
    },
    /// A directory the child needs could not be opened or created.
    #[error("{what} {}: {errno} — {fix}", path.display())]
    Dir {
        what: &'static str,
        path: PathBuf,
        errno: Errno,
        fix: &'static str,
    },
    /// A private-directory key is not a plain name.
    #[error("session key {key:?} is not usable as a directory name (1–64 of A-Z a-z 0-9 _ - .)")]
    BadKey { key: String },
    /// Building the landlock ruleset failed.
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    /// A step between fork and exec failed; the child never ran the program.
    #[error("starting {program}: {} failed: {errno} — {}", step.describe(), child_fix(*step, *errno))]
    ChildSetup {
        program: String,
        step: ChildStep,
        errno: Errno,
    },
    /// `exec` (or fork) failed.
    #[error("starting {program} ({}): {source} — check the allowlist entry and that the run_as user can execute it", path.display())]
    Spawn {
        program: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Some other system call failed.
    #[error("{what}: {errno}")]
    Sys { what: &'static str, errno: Errno },
}

fn child_fix(step: ChildStep, errno: Errno) -> &'static str {
    match (step, errno) {
        (ChildStep::Chdir, Errno::EACCES) => {
            "the run_as user cannot enter the working directory: give it the project (chown -R USER DIR) or fix the permissions of its parents"
        }
        (ChildStep::Setuid | ChildStep::Setgid | ChildStep::Setgroups, _) => {
            "the daemon must run as root (or with CAP_SETUID/CAP_SETGID) to switch to process.run_as"
        }
        (ChildStep::Landlock, _) => {
            "the kernel refused the landlock ruleset; check dmesg and report it"
        }
        (ChildStep::Rlimit, _) => {
            "a process limit could not be set (a hard limit lower than configured?): lower process.max_* in the config"
        }
        _ => "this is unexpected; check the daemon's log and the host's state",
    }
}

/// The TCP ports a child may use (enforced on landlock ABI ≥ 4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPolicy {
    /// Ports the child may `bind` (the session's own server port).
    pub bind_ports: Vec<u16>,
    /// Ports the child may `connect` to, in addition to `process.connect_ports`.
    pub connect_ports: Vec<u16>,
}

/// A session's private `HOME` and `TMPDIR`, from [`ProcessGuard::private_dirs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateDirs {
    pub home: PathBuf,
    pub tmp: PathBuf,
}

/// What to start. Every path-like input is a directory fd the caller obtained through the path
/// guard, so no string is resolved again between the check and the use.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    /// Allowlist name (never a path from the wire).
    pub program: &'a str,
    /// Arguments after the entry's fixed prefix. The caller puts `--` before user paths.
    pub args: Vec<OsString>,
    /// The project directory (read-write for the child), e.g. from `RootDir::open_dir`.
    pub project_dir: BorrowedFd<'a>,
    /// Working directory (a directory beneath the project); `None` = the project directory.
    pub cwd: Option<BorrowedFd<'a>>,
    /// Private `HOME` and `TMPDIR` (read-write for the child).
    pub private: &'a PrivateDirs,
    /// Variables set by the caller (e.g. a session's credentials). Names are checked.
    pub extra_env: Vec<(String, OsString)>,
    pub net: NetPolicy,
}

/// The resource limits a child runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RlimitReport {
    pub open_files: u64,
    pub processes: u64,
    /// Always 0.
    pub core: u64,
    pub address_space_bytes: Option<u64>,
    pub cpu_seconds: Option<u64>,
}

/// What protected a spawned child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectionReport {
    /// The kernel's landlock ABI, `None` if landlock is unavailable.
    pub landlock_abi: Option<u8>,
    pub fs: FsProtection,
    pub net: NetProtection,
    /// Signals and abstract UNIX sockets scoped to the sandbox (ABI ≥ 6).
    pub scoped: bool,
    pub no_new_privs: bool,
    /// `uid:gid` the child runs as.
    pub user: String,
    /// False when the daemon is not root and the child runs as the daemon's own user.
    pub user_dropped: bool,
    pub rlimits: RlimitReport,
}

impl ProtectionReport {
    /// The level obtained, comparable with `process.min_protection`.
    pub fn level(&self) -> ProtectionLevel {
        match (self.fs, self.net) {
            (FsProtection::None, _) => ProtectionLevel::None,
            (_, NetProtection::Enforced) => ProtectionLevel::FsNet,
            (_, NetProtection::Unsupported) => ProtectionLevel::Fs,
        }
    }

    /// Short, stable form for `sv` and telemetry: `none`, `landlock-v3:fs`,
    /// `landlock-v2:fs-partial`, `landlock-v4:fs+net`, `landlock-v6:fs+net+scope`.
    pub fn short(&self) -> String {
        let Some(abi) = self.landlock_abi.filter(|_| self.fs != FsProtection::None) else {
            return "none".to_owned();
        };
        let mut s = format!("landlock-v{abi}:");
        s.push_str(match self.fs {
            FsProtection::Partial => "fs-partial",
            _ => "fs",
        });
        if self.net == NetProtection::Enforced {
            s.push_str("+net");
        }
        if self.scoped {
            s.push_str("+scope");
        }
        s
    }
}

impl fmt::Display for ProtectionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} user={}{} no_new_privs={} nofile={} nproc={} core=0",
            self.short(),
            self.user,
            if self.user_dropped {
                ""
            } else {
                " (the daemon's own user)"
            },
            self.no_new_privs,
            self.rlimits.open_files,
            self.rlimits.processes,
        )?;
        if let Some(a) = self.rlimits.address_space_bytes {
            write!(f, " as={a}")?;
        }
        if let Some(c) = self.rlimits.cpu_seconds {
            write!(f, " cpu={c}s")?;
        }
        Ok(())
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Not our child (re-adopted after a restart): it is gone, how is unknown.
    Unknown,
}

impl Exit {
    fn from_status(status: std::process::ExitStatus) -> Exit {
        match (status.code(), status.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(s)) => Exit::Signal(s),
            (None, None) => Exit::Unknown,
        }
    }
}

/// A process by (pid, start time): what the session registry stores to re-adopt a session
/// after a restart. The pid is also the process group id (the child called `setsid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat` (clock ticks after boot).
    pub start_time: u64,
}

impl ProcessId {
    /// Still running (not exited, not a recycled pid).
    pub fn is_alive(&self) -> bool {
        is_alive(self.pid, self.start_time)
    }

    /// Signal the process group (see [`kill_group`]).
    pub fn signal_group(&self, signal: Signal) -> Result<GroupSignal, KillGroupError> {
        kill_group(self.pid, self.start_time, signal)
    }

    /// For a re-adopted process that is not our child: wait until it is gone, checking every
    /// `poll`. The exit status cannot be known.
    pub async fn wait_exit(self, poll: Duration) -> Exit {
        while self.is_alive() {
            smol::Timer::after(poll).await;
        }
        Exit::Unknown
    }
}

/// Signal the process group `pgid` whose leader started at `leader_start_time`, never a
/// recycled one (rules in [`procfs::kill_group`]).
pub fn kill_group(
    pgid: i32,
    leader_start_time: u64,
    signal: Signal,
) -> Result<GroupSignal, KillGroupError> {
    procfs::kill_group(pgid, leader_start_time, signal)
}

/// A started, sandboxed child.
///
/// Read both `stdout` and `stderr` (or drop them): a child blocks once a pipe it writes to is
/// full (64 KiB). Dropping a `GuardedChild` does not stop the process (sessions outlive their
/// handles, and the daemon); it hands the reaping to a small thread so no zombie is left.
#[derive(Debug)]
pub struct GuardedChild {
    pub pid: i32,
    /// Equal to `pid` (own session).
    pub pgid: i32,
    /// Field 22 of `/proc/PID/stat`.
    pub start_time: u64,
    /// Take these to read the output; stdin is `/dev/null`.
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    pub protection: ProtectionReport,
    /// `None` once handed to [`GuardedChild::wait_exit`].
    child: Option<Child>,
}

impl Drop for GuardedChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                // Not exited yet: wait for it elsewhere. If the thread cannot be started, the
                // zombie is reaped when the daemon exits (init adopts it).
                let _ = std::thread::Builder::new()
                    .name(format!("reap-{}", self.pid))
                    .spawn(move || child.wait());
            }
        }
    }
}

impl GuardedChild {
    /// (pid, start time), for the registry and for signalling after `wait_exit` took `self`.
    pub fn id(&self) -> ProcessId {
        ProcessId {
            pid: self.pid,
            start_time: self.start_time,
        }
    }

    /// Signal the child's whole process group.
    pub fn signal_group(&self, signal: Signal) -> Result<GroupSignal, KillGroupError> {
        self.id().signal_group(signal)
    }

    /// Reap the child if it has exited (the rest of its group may live on).
    pub fn try_wait(&mut self) -> std::io::Result<Option<Exit>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?.map(Exit::from_status)),
            None => Ok(None),
        }
    }

    /// Block until the child exits and reap it.
    pub fn wait(&mut self) -> std::io::Result<Exit> {
        match self.child.as_mut() {
            Some(child) => child.wait().map(Exit::from_status),
            None => Err(std::io::Error::other(
                "the child was already handed to wait_exit",
            )),
        }
    }

    /// Wait on a blocking thread (smol's pool) and reap. Take `stdout`/`stderr` and keep
    /// [`GuardedChild::id`] first if you still need them.
    pub async fn wait_exit(mut self) -> std::io::Result<Exit> {
        let child = self.child.take();
        match child {
            Some(mut child) => smol::unblock(move || child.wait().map(Exit::from_status)).await,
            None => Err(std::io::Error::other(
                "the child was already handed to wait_exit",
            )),
        }
    }
}

/// The identity children run as.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    /// Switch to this user (the daemon is root).
    Drop {
        uid: u32,
        gid: u32,
        name: Option<String>,
    },
    /// Stay the daemon's user (the daemon is not root).
    Inherit { uid: u32, gid: u32 },
}

/// The process guard, built once from `[process]`.
#[derive(Debug)]
pub struct ProcessGuard {
    config: ProcessConfig,
    identity: Identity,
    /// Every allowlisted program file (granted read + execute in the sandbox).
    program_files: Vec<PathBuf>,
    support: LandlockSupport,
}

impl ProcessGuard {
    /// Build the guard. The config was validated at load; this re-checks only what depends
    /// on how the daemon runs: a root daemon must have a `run_as` user.
    pub fn new(config: &ProcessConfig) -> Result<ProcessGuard, ProcessError> {
        let euid = nix::unistd::geteuid().as_raw();
        let identity = match (&config.run_as, euid) {
            (Some(r), 0) => Identity::Drop {
                uid: r.uid,
                gid: r.gid,
                name: r.name.clone(),
            },
            (None, 0) => return Err(ProcessError::WouldRunAsRoot),
            (_, uid) => Identity::Inherit {
                uid,
                gid: nix::unistd::getegid().as_raw(),
            },
        };
        let mut program_files: Vec<PathBuf> = config
            .allowlist
            .values()
            .map(|p| std::fs::canonicalize(&p.path).unwrap_or_else(|_| p.path.clone()))
            .collect();
        program_files.sort();
        program_files.dedup();
        Ok(ProcessGuard {
            config: config.clone(),
            identity,
            program_files,
            support: landlock_support(),
        })
    }

    /// What this kernel offers.
    pub fn landlock_support(&self) -> LandlockSupport {
        self.support
    }

    /// The allowlisted program names.
    pub fn programs(&self) -> impl Iterator<Item = &str> {
        self.config.allowlist.keys().map(String::as_str)
    }

    /// `uid:gid` children run as, and whether that is a dropped (unprivileged) identity.
    pub fn user(&self) -> (String, bool) {
        match &self.identity {
            Identity::Drop { uid, gid, .. } => (format!("{uid}:{gid}"), true),
            Identity::Inherit { uid, gid } => (format!("{uid}:{gid}"), false),
        }
    }

    /// Create (or reuse) `private_dir/<key>/{home,tmp}` for a session: `private_dir` and
    /// `<key>` owned by the daemon with mode 0711 (the child can pass through, not list or
    /// rename), `home` and `tmp` owned by the run_as user with mode 0700. Existing entries
    /// must be real directories (no symlinks) with that ownership.
    pub fn private_dirs(&self, key: &str) -> Result<PrivateDirs, ProcessError> {
        let ok_key = (1..=MAX_KEY_LEN).contains(&key.len())
            && key != "."
            && key != ".."
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok_key {
            return Err(ProcessError::BadKey {
                key: key.to_owned(),
            });
        }
        let (uid, gid) = match &self.identity {
            Identity::Drop { uid, gid, .. } | Identity::Inherit { uid, gid } => (*uid, *gid),
        };
        let me = nix::unistd::geteuid().as_raw();
        let base = &self.config.private_dir;
        ensure_dir(base, 0o711, me, None, "private_dir")?;
        let session = base.join(key);
        ensure_dir(&session, 0o711, me, None, "session private directory")?;
        let home = session.join("home");
        let tmp = session.join("tmp");
        ensure_dir(&home, 0o700, uid, Some(gid), "private home")?;
        ensure_dir(&tmp, 0o700, uid, Some(gid), "private tmp")?;
        Ok(PrivateDirs { home, tmp })
    }

    /// Start `spec.program` sandboxed. See the module doc for everything that happens.
    pub fn spawn(&self, spec: SpawnSpec<'_>) -> Result<GuardedChild, ProcessError> {
        let entry =
            self.config
                .allowlist
                .get(spec.program)
                .ok_or_else(|| ProcessError::NotAllowed {
                    program: spec.program.to_owned(),
                })?;
        for (index, arg) in entry.args.iter().chain(&spec.args).enumerate() {
            if arg.as_bytes().contains(&0) {
                return Err(ProcessError::NulInArgument { index });
            }
        }
        let env = self.child_env(&spec)?;

        // Directories: the project and cwd fds come from the caller; home and tmp are opened
        // here without following a final symlink.
        let home_fd = open_dir_nofollow(&spec.private.home, "private home")?;
        let tmp_fd = open_dir_nofollow(&spec.private.tmp, "private tmp")?;
        for (fd, what) in [
            (Some(spec.project_dir), "project directory"),
            (spec.cwd, "working directory"),
        ] {
            if let Some(fd) = fd {
                let st = nix::sys::stat::fstat(fd).map_err(|errno| ProcessError::Sys {
                    what: "fstat of the project directory",
                    errno,
                })?;
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    return Err(ProcessError::Dir {
                        what,
                        path: PathBuf::from("(fd)"),
                        errno: Errno::ENOTDIR,
                        fix: "pass a directory opened through the path guard",
                    });
                }
            }
        }
        let cwd = spec.cwd.unwrap_or(spec.project_dir);

        // Landlock, prepared here; restricted in the child.
        let mut connect: Vec<u16> = self
            .config
            .connect_ports
            .iter()
            .chain(&spec.net.connect_ports)
            .copied()
            .collect();
        connect.sort_unstable();
        connect.dedup();
        let mut bind = spec.net.bind_ports.clone();
        bind.sort_unstable();
        bind.dedup();
        let rw_dirs = [spec.project_dir, home_fd.as_fd(), tmp_fd.as_fd()];
        let built = sandbox::build(&SandboxPlan {
            extra_exec_dirs: &self.config.system_paths,
            program_files: &self.program_files,
            rw_dirs: &rw_dirs,
            bind_ports: &bind,
            connect_ports: &connect,
        })?;
        let protection = self.report(&built);
        if protection.level() < self.config.min_protection {
            return Err(ProcessError::BelowMinimum {
                program: spec.program.to_owned(),
                obtained: protection.short(),
                required: self.config.min_protection,
                explain: self.support.explain(),
            });
        }

        // The child's setup, as plain numbers.
        let (report_r, report_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|errno| ProcessError::Sys {
                what: "pipe2",
                errno,
            })?;
        let fd_scan_limit = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft.min(1 << 20) as u32)
            .unwrap_or(1 << 16);
        let setup = ChildSetup {
            rlimits: self.rlimits(),
            drop_to: match &self.identity {
                Identity::Drop { uid, gid, .. } => Some((*uid, *gid)),
                Identity::Inherit { .. } => None,
            },
            cwd_fd: cwd.as_raw_fd(),
            ruleset_fd: built.ruleset_fd.as_ref().map(|fd| fd.as_raw_fd()),
            report_fd: report_w.as_raw_fd(),
            fd_scan_limit,
        };

        let mut cmd = Command::new(&entry.path);
        cmd.args(&entry.args)
            .args(&spec.args)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: `ChildSetup::run` only makes async-signal-safe system calls on `Copy` data
        // (see `child`); the fds it names stay open until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || setup.run());
        }
        let spawned = cmd.spawn();
        drop(report_w);
        let mut child = match spawned {
            Ok(c) => c,
            Err(source) => {
                let mut buf = [0u8; 6];
                let mut file = std::fs::File::from(report_r);
                let n = file.read(&mut buf).unwrap_or(0);
                return Err(match ChildFailure::parse(&buf[..n]) {
                    Some(f) => ProcessError::ChildSetup {
                        program: spec.program.to_owned(),
                        step: f.step,
                        errno: Errno::from_raw(f.errno),
                    },
                    None => ProcessError::Spawn {
                        program: spec.program.to_owned(),
                        path: entry.path.clone(),
                        source,
                    },
                });
            }
        };
        drop(report_r);
        drop(built);
        let pid = child.id() as i32;
        // The child is not reaped yet, so its /proc entry exists (even if it already exited).
        let start_time = procfs::start_time(pid).unwrap_or(0);
        Ok(GuardedChild {
            pid,
            pgid: pid,
            start_time,
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            protection,
            child: Some(child),
        })
    }

    /// The limits in the kernel's `rlim_t`, which is 32 bits on 32-bit ARM: a configured value
    /// that does not fit saturates to `RLIM_INFINITY`'s neighbour (the type's maximum).
    fn rlimits(&self) -> [Option<(Resource, child::RlimT)>; MAX_RLIMITS] {
        let l = &self.config.limits;
        let fit = |v: u64| child::RlimT::try_from(v).unwrap_or(child::RlimT::MAX);
        [
            Some((Resource::RLIMIT_CORE, 0)),
            Some((Resource::RLIMIT_NOFILE, fit(l.max_open_files))),
            Some((Resource::RLIMIT_NPROC, fit(l.max_processes))),
            l.max_address_space_mb
                .map(|mb| (Resource::RLIMIT_AS, fit(mb.saturating_mul(1 << 20)))),
            l.max_cpu_seconds.map(|s| (Resource::RLIMIT_CPU, fit(s))),
            None,
        ]
    }

    fn report(&self, built: &BuiltSandbox) -> ProtectionReport {
        let l = &self.config.limits;
        let (user, user_dropped) = self.user();
        ProtectionReport {
            landlock_abi: self.support.abi(),
            fs: built.fs,
            net: built.net,
            scoped: built.scoped,
            no_new_privs: true,
            user,
            user_dropped,
            rlimits: RlimitReport {
                open_files: l.max_open_files,
                processes: l.max_processes,
                core: 0,
                address_space_bytes: l.max_address_space_mb.map(|mb| mb.saturating_mul(1 << 20)),
                cpu_seconds: l.max_cpu_seconds,
            },
        }
    }

    /// The child's environment: passed-through names, the guard's own, then the caller's.
    fn child_env(
        &self,
        spec: &SpawnSpec<'_>,
    ) -> Result<BTreeMap<OsString, OsString>, ProcessError> {
        let mut env = BTreeMap::new();
        for name in &self.config.env_pass {
            // Config validation refused forbidden names; checked again as the last word.
            if forbidden_env_name(name).is_none() {
                if let Some(value) = std::env::var_os(name) {
                    env.insert(OsString::from(name), value);
                }
            }
        }
        env.insert("PATH".into(), CHILD_PATH.into());
        env.insert("HOME".into(), spec.private.home.clone().into_os_string());
        env.insert("TMPDIR".into(), spec.private.tmp.clone().into_os_string());
        if let Identity::Drop {
            name: Some(name), ..
        } = &self.identity
        {
            env.insert("USER".into(), name.into());
            env.insert("LOGNAME".into(), name.into());
        }
        for (name, value) in &spec.extra_env {
            if let Some(why) = forbidden_env_name(name) {
                return Err(ProcessError::ForbiddenEnv {
                    name: name.clone(),
                    why,
                });
            }
            if value.as_bytes().contains(&0) {
                return Err(ProcessError::NulInEnv { name: name.clone() });
            }
            env.insert(OsString::from(name), value.clone());
        }
        Ok(env)
    }
}

fn open_dir_nofollow(path: &Path, what: &'static str) -> Result<OwnedFd, ProcessError> {
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| ProcessError::Dir {
        what,
        path: path.to_owned(),
        errno,
        fix: "create it with ProcessGuard::private_dirs (a real directory, not a symlink)",
    })
}

/// Create `path` (one level) or check the existing one: a real directory owned by `uid`
/// (and `gid` if given) with exactly `mode`; a wrong mode is corrected, a wrong owner or a
/// symlink is refused.
fn ensure_dir(
    path: &Path,
    mode: u32,
    uid: u32,
    gid: Option<u32>,
    what: &'static str,
) -> Result<(), ProcessError> {
    let err = |errno: Errno, fix: &'static str| ProcessError::Dir {
        what,
        path: path.to_owned(),
        errno,
        fix,
    };
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {
            nix::unistd::chown(
                path,
                Some(nix::unistd::Uid::from_raw(uid)),
                gid.map(nix::unistd::Gid::from_raw),
            )
            .map_err(|e| err(e, "the daemon must be able to chown it (run as root)"))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(err(
                Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                "check that the parent exists and the daemon may write it (process.private_dir)",
            ));
        }
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| {
        err(
            Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            "check the path",
        )
    })?;
    if !meta.file_type().is_dir() {
        return Err(err(
            Errno::ENOTDIR,
            "it must be a real directory (not a symlink): remove it and let the daemon recreate it",
        ));
    }
    if meta.uid() != uid || gid.is_some_and(|g| meta.gid() != g) {
        return Err(err(
            Errno::EPERM,
            "it has the wrong owner: remove it and let the daemon recreate it",
        ));
    }
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            err(
                Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                "fix its permissions",
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        abi: Option<u8>,
        fs: FsProtection,
        net: NetProtection,
        scoped: bool,
    ) -> ProtectionReport {
        ProtectionReport {
            landlock_abi: abi,
            fs,
            net,
            scoped,
            no_new_privs: true,
            user: "65534:65534".to_owned(),
            user_dropped: true,
            rlimits: RlimitReport {
                open_files: 4096,
                processes: 4096,
                core: 0,
                address_space_bytes: None,
                cpu_seconds: None,
            },
        }
    }

    #[test]
    fn report_short_form() {
        use FsProtection as F;
        use NetProtection as N;
        let r = report(Some(6), F::Full, N::Enforced, true);
        assert_eq!(r.short(), "landlock-v6:fs+net+scope");
        assert_eq!(r.level(), ProtectionLevel::FsNet);
        assert_eq!(
            r.to_string(),
            "landlock-v6:fs+net+scope user=65534:65534 no_new_privs=true nofile=4096 nproc=4096 core=0"
        );
        let r = report(Some(4), F::Full, N::Enforced, false);
        assert_eq!(r.short(), "landlock-v4:fs+net");
        let r = report(Some(3), F::Full, N::Unsupported, false);
        assert_eq!(r.short(), "landlock-v3:fs");
        assert_eq!(r.level(), ProtectionLevel::Fs);
        let r = report(Some(2), F::Partial, N::Unsupported, false);
        assert_eq!(r.short(), "landlock-v2:fs-partial");
        assert_eq!(r.level(), ProtectionLevel::Fs);
        let mut r = report(None, F::None, N::Unsupported, false);
        assert_eq!(r.short(), "none");
        assert_eq!(r.level(), ProtectionLevel::None);
        r.user_dropped = false;
        r.rlimits.cpu_seconds = Some(60);
        assert!(r.to_string().contains("(the daemon's own user)"));
        assert!(r.to_string().ends_with("cpu=60s"));
        assert!(ProtectionLevel::None < ProtectionLevel::Fs);
        assert!(ProtectionLevel::Fs < ProtectionLevel::FsNet);
    }

    #[test]
    fn offered_levels() {
        assert_eq!(
            level_offered(LandlockSupport::NotEnabled),
            ProtectionLevel::None
        );
        assert_eq!(
            level_offered(LandlockSupport::Available(3)),
            ProtectionLevel::Fs
        );
        assert_eq!(
            level_offered(LandlockSupport::Available(4)),
            ProtectionLevel::FsNet
        );
    }

    #[test]
    fn child_failure_round_trip() {
        let e = libc::EACCES.to_le_bytes();
        let f = ChildFailure::parse(&[ChildStep::Chdir as u8, 0, e[0], e[1], e[2], e[3]]).unwrap();
        assert_eq!(f.step, ChildStep::Chdir);
        assert_eq!(f.errno, libc::EACCES);
        assert!(ChildFailure::parse(&[1, 0, 0]).is_none());
        assert!(ChildFailure::parse(&[99, 0, 0, 0, 0, 0]).is_none());
    }

    #[test]
    fn this_kernel_has_landlock() {
        // The hosts we ship to (and CI) run kernels with landlock enabled; this guards against
        // a test environment silently running every sandbox test without a sandbox.
        let support = landlock_support();
        assert!(support.abi().is_some(), "{}", support.explain());
    }
}
