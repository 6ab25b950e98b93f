//! The landlock half of the process guard: probe what this kernel offers, and build the ruleset
//! **in the daemon, before fork**. Only `landlock_restrict_self(fd)` runs in the child (see the
//! private `child` module), because a landlock domain applies to the calling thread and is
//! inherited by everything it later starts, and because building a ruleset allocates and opens
//! files, which a forked child of a multi-threaded daemon must not do.
//!
//! What a sandboxed process may touch (everything else is denied by the kernel):
//!
//! | where | rights |
//! |---|---|
//! | system directories (`/usr`, `/lib`, `/lib64`, `/lib32`, `/bin`, `/sbin`: [`SYSTEM_EXEC_DIRS`]) and `process.system_paths` (e.g. `/opt/opencode`) | read, execute |
//! | each allowlisted program file | read, execute |
//! | a fixed list of files and directories under `/etc` ([`ETC_READ_PATHS`]) and `/proc`, `/sys` | read |
//! | `/dev/null`, `/dev/zero`, `/dev/full`, `/dev/random`, `/dev/urandom`, `/dev/tty` | read, write |
//! | the session's project directory, private home and private tmp | read, write, create, remove — **not execute** |
//!
//! Not all of `/etc`: when the daemon does not run as root, its own config and device key
//! (`/etc/codemantle/…`) would be readable by the child under the same uid, so only what
//! programs need (loader cache, TLS roots, name service, time zone, git and ssh system config)
//! is granted. Not execute in the writable directories: a binary dropped into the project (or
//! home, or tmp) cannot be run. This does not stop interpreters (`sh x.sh`, `python3 x.py`),
//! which read the script; the sandbox confines what any program can reach, not which programs
//! run.
//!
//! Network (ABI ≥ 4): TCP `bind` only on the session's ports and TCP `connect` only on the
//! configured ports. Landlock covers TCP only: UDP (DNS included) and pathname UNIX sockets are
//! not restricted by it. Scopes (ABI ≥ 6): no signals to processes outside the sandbox, no
//! connecting to abstract UNIX sockets created outside it (dbus, systemd, X11).
//!
//! Older kernels: the ruleset requests exactly the rights of the kernel's ABI (capped at the
//! newest ABI this code was tested with, [`NEWEST_TESTED_ABI`]), with the crate's
//! `HardRequirement` level, so nothing is dropped behind our back; what is missing is reported
//! in [`FsProtection`]/[`NetProtection`] and checked against `process.min_protection`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, Scope,
};

/// Directories granted read + execute when they exist.
pub const SYSTEM_EXEC_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32"];

/// Files and directories under `/etc` granted read-only when they exist.
pub const ETC_READ_PATHS: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ld.so.preload",
    "/etc/ssl",
    "/etc/pki",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/crypto-policies",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/passwd",
    "/etc/group",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/zoneinfo",
    "/etc/mime.types",
    "/etc/os-release",
    "/etc/alternatives",
    "/etc/inputrc",
    "/etc/terminfo",
    "/etc/gitconfig",
    "/etc/gitattributes",
    "/etc/ssh/ssh_config",
    "/etc/ssh/ssh_config.d",
    "/etc/ssh/ssh_known_hosts",
];

/// Other read-only trees: process information (a process reading `/proc/self`; landlock's
/// ptrace rules keep it out of other processes' memory and environment) and `/sys` (CPU count,
/// cgroup limits, which runtimes such as Bun and Node read).
pub const OTHER_READ_PATHS: &[&str] = &["/proc", "/sys"];

/// Device files granted read + write.
pub const DEV_RW_FILES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
];

/// The newest landlock ABI whose rights this code requests (and was tested with). A newer
/// kernel is used at this ABI; its number is still reported.
pub const NEWEST_TESTED_ABI: u8 = 6;

/// Whether this kernel offers landlock, probed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockSupport {
    /// Landlock is enabled; the kernel's ABI version.
    Available(u8),
    /// Built into the kernel but not in the active LSM list (`EOPNOTSUPP`).
    NotEnabled,
    /// Not built into the kernel, or blocked by a seccomp filter (`ENOSYS`).
    NotImplemented,
}

impl LandlockSupport {
    /// The kernel's ABI version, if landlock is usable.
    pub fn abi(self) -> Option<u8> {
        match self {
            LandlockSupport::Available(v) => Some(v),
            _ => None,
        }
    }

    /// For messages: what is missing and how to get it.
    pub fn explain(self) -> &'static str {
        match self {
            LandlockSupport::Available(_) => "landlock is available",
            LandlockSupport::NotEnabled => {
                "landlock is built into this kernel but not enabled: add `landlock` to the lsm= kernel parameter (e.g. lsm=landlock,lockdown,yama,integrity,apparmor,bpf) and reboot"
            }
            LandlockSupport::NotImplemented => {
                "this kernel has no landlock (Linux 5.13 or newer with CONFIG_SECURITY_LANDLOCK, or a container runtime whose seccomp profile blocks the landlock system calls)"
            }
        }
    }
}

/// Probe the running kernel (once per process): `landlock_create_ruleset(NULL, 0, VERSION)`.
pub fn landlock_support() -> LandlockSupport {
    static SUPPORT: OnceLock<LandlockSupport> = OnceLock::new();
    *SUPPORT.get_or_init(|| {
        const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
        // SAFETY: with a NULL attribute and size 0 this system call only returns a number.
        let v = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                LANDLOCK_CREATE_RULESET_VERSION,
            )
        };
        if v > 0 {
            LandlockSupport::Available(u8::try_from(v).unwrap_or(u8::MAX))
        } else if nix::errno::Errno::last() == nix::errno::Errno::EOPNOTSUPP {
            LandlockSupport::NotEnabled
        } else {
            LandlockSupport::NotImplemented
        }
    })
}

/// How far the filesystem is confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FsProtection {
    /// No landlock: only file permissions (and the unprivileged user) protect the host.
    None,
    /// Landlock ABI 1 or 2: reads, writes, creation, removal and execution are confined, but
    /// `truncate(2)` of a file the user may write is not (handled from ABI 3).
    Partial,
    /// Every filesystem right this code knows of is confined.
    Full,
}

/// Whether TCP is confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NetProtection {
    /// Landlock before ABI 4 (or none): any TCP bind or connect the user may do is allowed.
    Unsupported,
    /// TCP bind and connect only on the allowed ports.
    Enforced,
}

/// What to grant, in paths the daemon resolved (system directories) and fds it opened
/// (the session's directories).
pub(crate) struct SandboxPlan<'a> {
    /// Extra read + execute directories from `process.system_paths`.
    pub extra_exec_dirs: &'a [PathBuf],
    /// The allowlisted program files (read + execute).
    pub program_files: &'a [PathBuf],
    /// Read-write directories, as open fds (project, home, tmp).
    pub rw_dirs: &'a [BorrowedFd<'a>],
    pub bind_ports: &'a [u16],
    pub connect_ports: &'a [u16],
}

/// A ruleset ready for `landlock_restrict_self` in the child, and what it will enforce.
#[derive(Debug)]
pub(crate) struct BuiltSandbox {
    /// `None` when landlock is unavailable (nothing to restrict).
    pub ruleset_fd: Option<OwnedFd>,
    pub fs: FsProtection,
    pub net: NetProtection,
    /// Signals and abstract UNIX sockets scoped to the sandbox (ABI ≥ 6).
    pub scoped: bool,
}

/// Why a ruleset could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The landlock crate refused (a bug here, or a kernel that lies about its ABI).
    #[error("building the landlock ruleset failed: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

fn abi_enum(v: u8) -> ABI {
    match v.min(NEWEST_TESTED_ABI) {
        0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        _ => ABI::V6,
    }
}

/// Build the ruleset for `plan` on this kernel.
pub(crate) fn build(plan: &SandboxPlan<'_>) -> Result<BuiltSandbox, SandboxError> {
    let Some(kernel_abi) = landlock_support().abi() else {
        return Ok(BuiltSandbox {
            ruleset_fd: None,
            fs: FsProtection::None,
            net: NetProtection::Unsupported,
            scoped: false,
        });
    };
    let abi = abi_enum(kernel_abi);
    let used = kernel_abi.min(NEWEST_TESTED_ABI);
    let all = AccessFs::from_all(abi);
    let read_exec = AccessFs::from_read(abi);
    let read = read_exec & !AccessFs::Execute;
    let file_rights = AccessFs::from_file(abi);
    // Read-write: everything but execute. (IoctlDev there is harmless: no devices in them.)
    let read_write = all & !AccessFs::Execute;
    let dev_rw = (AccessFs::ReadFile | AccessFs::WriteFile) & file_rights;

    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(all)?;
    let net = used >= 4;
    if net {
        ruleset = ruleset.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?;
    }
    let scoped = used >= 6;
    if scoped {
        ruleset = ruleset.scope(Scope::Signal | Scope::AbstractUnixSocket)?;
    }
    let mut created: RulesetCreated = ruleset.create()?;

    let grant_path = |created: RulesetCreated,
                      path: &Path,
                      rights: BitFlags<AccessFs>|
     -> Result<RulesetCreated, SandboxError> {
        // Missing system paths are normal (no /lib32 here, no /etc/pki there): skip them.
        let Ok(fd) = PathFd::new(path) else {
            return Ok(created);
        };
        let is_dir = nix::sys::stat::fstat(fd.as_fd())
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
            .unwrap_or(false);
        let rights = if is_dir { rights } else { rights & file_rights };
        if rights.is_empty() {
            return Ok(created);
        }
        Ok(created.add_rule(PathBeneath::new(fd, rights))?)
    };

    for dir in SYSTEM_EXEC_DIRS {
        created = grant_path(created, Path::new(dir), read_exec)?;
    }
    for dir in plan.extra_exec_dirs {
        created = grant_path(created, dir, read_exec)?;
    }
    for file in plan.program_files {
        created = grant_path(
            created,
            file,
            (AccessFs::ReadFile | AccessFs::Execute) & file_rights,
        )?;
    }
    for path in ETC_READ_PATHS.iter().chain(OTHER_READ_PATHS) {
        created = grant_path(created, Path::new(path), read)?;
    }
    for file in DEV_RW_FILES {
        created = grant_path(created, Path::new(file), dev_rw)?;
    }
    for fd in plan.rw_dirs {
        created = created.add_rule(PathBeneath::new(*fd, read_write))?;
    }
    if net {
        for &port in plan.bind_ports {
            created = created.add_rule(NetPort::new(port, AccessNet::BindTcp))?;
        }
        for &port in plan.connect_ports {
            created = created.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
        }
    }
    let ruleset_fd: Option<OwnedFd> = created.into();
    Ok(BuiltSandbox {
        fs: match (ruleset_fd.is_some(), used) {
            (false, _) => FsProtection::None,
            (true, 1 | 2) => FsProtection::Partial,
            (true, _) => FsProtection::Full,
        },
        net: if net && ruleset_fd.is_some() {
            NetProtection::Enforced
        } else {
            NetProtection::Unsupported
        },
        scoped: scoped && ruleset_fd.is_some(),
        ruleset_fd,
    })
}
