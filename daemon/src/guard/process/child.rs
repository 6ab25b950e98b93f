//! The part of a spawn that runs **in the child, between `fork` and `exec`**.
//!
//! The daemon is multi-threaded; after `fork` only the forking thread exists in the child, and
//! any lock another thread held (the allocator's, stdio's, the dynamic loader's) stays locked
//! forever. So this code only makes system calls: no allocation, no formatting, no locks, no
//! `Drop` of anything that frees memory. Everything that needs memory or files (the landlock
//! ruleset, the environment, argv, the cwd fd, the rlimit values) is prepared by the parent
//! before fork and captured here as plain numbers ([`ChildSetup`] is `Copy`).
//!
//! Order, and why:
//!
//! 1. `setsid()`: own session and process group (pgid = pid), so the whole tree the program
//!    starts can be signalled with one `killpg`, and no controlling terminal.
//! 2. `setrlimit` (core 0, open files, processes, optional address space and CPU): before the
//!    uid change, while lowering hard limits cannot be undone by the child.
//! 3. `setgroups(0)`, `setresgid`, `setresuid` to the `run_as` user when the daemon is root,
//!    then read them back (`getresuid`/`getresgid`/`getgroups`) — a half-dropped identity is
//!    refused, not run.
//! 4. `fchdir(cwd_fd)`: as the new user, so a directory it cannot enter fails here, clearly.
//! 5. `prctl(PR_SET_NO_NEW_PRIVS)`: no setuid/setgid/file-capability gains through `exec`;
//!    required by landlock for an unprivileged caller.
//! 6. `landlock_restrict_self(ruleset_fd)`: the child and everything it starts are confined.
//! 7. `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`: every inherited descriptor above stderr is
//!    closed at `exec` (std already opens its own with `O_CLOEXEC`; this catches any other
//!    library that did not). CLOEXEC rather than close, so std's exec-error pipe still works.
//!
//! No `PR_SET_PDEATHSIG`: sessions must outlive a daemon restart (the registry re-adopts them
//! by pid and start time), and the "parent" that death signal watches is the forking *thread*,
//! which would kill the session whenever that thread of the executor exits.
//!
//! Failures are reported to the parent through a pipe as `[step, detail, errno (4 bytes LE)]`
//! before the error is returned to std (which reports only the errno).

use std::io;
use std::os::fd::RawFd;

use nix::sys::resource::Resource;

/// The kernel's rlimit value type (`u32` on 32-bit ARM, `u64` elsewhere).
pub(crate) type RlimT = nix::sys::resource::rlim_t;

/// Most rlimits set in the child.
pub(crate) const MAX_RLIMITS: usize = 6;

/// Which step of the child setup failed (the first byte of a failure report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChildStep {
    Setsid = 1,
    Rlimit = 2,
    Setgroups = 3,
    Setgid = 4,
    Setuid = 5,
    VerifyIdentity = 6,
    Chdir = 7,
    NoNewPrivs = 8,
    Landlock = 9,
    CloseFds = 10,
}

impl ChildStep {
    pub(crate) fn from_u8(v: u8) -> Option<ChildStep> {
        Some(match v {
            1 => ChildStep::Setsid,
            2 => ChildStep::Rlimit,
            3 => ChildStep::Setgroups,
            4 => ChildStep::Setgid,
            5 => ChildStep::Setuid,
            6 => ChildStep::VerifyIdentity,
            7 => ChildStep::Chdir,
            8 => ChildStep::NoNewPrivs,
            9 => ChildStep::Landlock,
            10 => ChildStep::CloseFds,
            _ => return None,
        })
    }

    /// What the step does, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            ChildStep::Setsid => "setsid (own session and process group)",
            ChildStep::Rlimit => "setrlimit",
            ChildStep::Setgroups => "setgroups (drop supplementary groups)",
            ChildStep::Setgid => "setresgid to the run_as group",
            ChildStep::Setuid => "setresuid to the run_as user",
            ChildStep::VerifyIdentity => "verifying the dropped identity",
            ChildStep::Chdir => "entering the working directory as the run_as user",
            ChildStep::NoNewPrivs => "prctl(PR_SET_NO_NEW_PRIVS)",
            ChildStep::Landlock => "landlock_restrict_self",
            ChildStep::CloseFds => "marking inherited descriptors close-on-exec",
        }
    }
}

/// Everything the child needs, as plain numbers. The fds stay open in the parent until
/// `spawn` returns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildSetup {
    pub rlimits: [Option<(Resource, RlimT)>; MAX_RLIMITS],
    /// `(uid, gid)` to switch to; `None` when the daemon is not root (it runs as itself).
    pub drop_to: Option<(u32, u32)>,
    pub cwd_fd: RawFd,
    pub ruleset_fd: Option<RawFd>,
    /// Write end of the failure-report pipe (`O_CLOEXEC`).
    pub report_fd: RawFd,
    /// Highest fd to scan when `close_range` is unavailable (the daemon's soft `RLIMIT_NOFILE`).
    pub fd_scan_limit: u32,
}

impl ChildSetup {
    /// Run the setup. Called from `pre_exec`, so async-signal-safe only (see the module doc).
    pub(crate) fn run(&self) -> io::Result<()> {
        // SAFETY (all blocks below): plain system calls on numbers and valid pointers to
        // stack memory; nothing allocates or takes a lock.
        if unsafe { libc::setsid() } < 0 {
            return self.fail(ChildStep::Setsid, 0);
        }
        for (i, limit) in self.rlimits.iter().enumerate() {
            if let Some((resource, value)) = *limit {
                if nix::sys::resource::setrlimit(resource, value, value).is_err() {
                    return self.fail(ChildStep::Rlimit, i as u8);
                }
            }
        }
        if let Some((uid, gid)) = self.drop_to {
            if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
                return self.fail(ChildStep::Setgroups, 0);
            }
            if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
                return self.fail(ChildStep::Setgid, 0);
            }
            if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
                return self.fail(ChildStep::Setuid, 0);
            }
            let (mut r, mut e, mut s) = (0, 0, 0);
            let uids_ok = unsafe { libc::getresuid(&mut r, &mut e, &mut s) } == 0
                && (r, e, s) == (uid, uid, uid);
            let gids_ok = unsafe { libc::getresgid(&mut r, &mut e, &mut s) } == 0
                && (r, e, s) == (gid, gid, gid);
            let groups_ok = unsafe { libc::getgroups(0, std::ptr::null_mut()) } == 0;
            if !(uids_ok && gids_ok && groups_ok) {
                return self.fail_with(ChildStep::VerifyIdentity, 0, libc::EPERM);
            }
        }
        if unsafe { libc::fchdir(self.cwd_fd) } != 0 {
            return self.fail(ChildStep::Chdir, 0);
        }
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return self.fail(ChildStep::NoNewPrivs, 0);
        }
        if let Some(fd) = self.ruleset_fd {
            if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) } != 0 {
                return self.fail(ChildStep::Landlock, 0);
            }
        }
        let closed = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if closed != 0 {
            // Kernels before 5.11: mark each one. EBADF (not open) is the common case.
            for fd in 3..self.fd_scan_limit.min(i32::MAX as u32) as RawFd {
                let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
                if flags >= 0
                    && flags & libc::FD_CLOEXEC == 0
                    && unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } != 0
                {
                    return self.fail(ChildStep::CloseFds, 0);
                }
            }
        }
        Ok(())
    }

    fn fail(&self, step: ChildStep, detail: u8) -> io::Result<()> {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        self.fail_with(step, detail, errno)
    }

    fn fail_with(&self, step: ChildStep, detail: u8, errno: i32) -> io::Result<()> {
        let e = errno.to_le_bytes();
        let report = [step as u8, detail, e[0], e[1], e[2], e[3]];
        // SAFETY: writes 6 bytes from the stack; a failed write only loses the detail.
        unsafe { libc::write(self.report_fd, report.as_ptr().cast(), report.len()) };
        Err(io::Error::from_raw_os_error(errno))
    }
}

/// A failure report read back by the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChildFailure {
    pub step: ChildStep,
    pub detail: u8,
    pub errno: i32,
}

impl ChildFailure {
    pub(crate) fn parse(bytes: &[u8]) -> Option<ChildFailure> {
        let [step, detail, a, b, c, d]: [u8; 6] = bytes.get(..6)?.try_into().ok()?;
        Some(ChildFailure {
            step: ChildStep::from_u8(step)?,
            detail,
            errno: i32::from_le_bytes([a, b, c, d]),
        })
    }
}
