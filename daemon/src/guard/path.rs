//! `guard::path`: file access confined beneath a root directory.
//!
//! # Why file descriptors and `openat2`, not `realpath`
//!
//! CodeMantle 0.1.50 checked paths by computing `realpath(root/p)` and testing that the result
//! starts with `realpath(root)`, then acted on the *unresolved* string. Between the check and the
//! use, anything that can write inside the tree (the coding agent, a checked-out repository, a
//! concurrent `rn`) can swap a directory for a symlink to `/etc`, and the operation lands
//! outside the root. No amount of re-checking fixes that: a string names a path, not a file.
//!
//! Here a root is an open directory fd ([`RootDir`], `O_PATH|O_DIRECTORY`), and every path is
//! resolved *by the kernel, from that fd*, in one system call:
//! `openat2(root_fd, p, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`. The kernel refuses (`EXDEV`)
//! any resolution that would leave the tree: a `..` above the root, an absolute symlink, a
//! relative symlink that climbs out, a `/proc/self/fd/N`-style magic link. What the handler gets
//! back is an fd; everything after that (`mkdirat`, `unlinkat`, `renameat2`, `fstatat`, reading a
//! directory) is relative to that fd and works on the name it was given *inside* the directory
//! that was checked, so a later swap changes nothing.
//!
//! # Rules
//!
//! Relative paths come from the wire as UTF-8 strings and are parsed by [`RelPath::parse`]:
//!
//! - `/` is the only separator. Empty components and `.` are ignored (`a//b/./c` is `a/b/c`;
//!   `""`, `"."` and `"/"`-free empty input mean the root itself).
//! - An absolute path (leading `/`) is rejected (`PATH`), not re-rooted: a caller that sends one
//!   has a bug, and silently re-rooting it would hide that.
//! - `..` is normalised *lexically*: `a/../b` is `b`. A `..` that would climb above the root is an
//!   escape attempt (`ROOT`). Lexical means `link/..` is the root even if `link` is a symlink
//!   somewhere else: the result can only ever be a shorter path inside the root, never a longer
//!   one outside it, so the kernel never sees a `..` that came from the wire.
//! - A NUL byte, a component longer than 255 bytes, or an input longer than 4096 bytes is
//!   rejected (`PATH`) before any system call.
//! - No trimming, no `\` translation, no Unicode normalisation: names are exact bytes.
//!   (0.1.50 trimmed whitespace and turned `\` into `/`; on Linux both are legal in names.)
//!
//! Symlinks met while resolving:
//!
//! - With `openat2` (Linux ≥ 5.6): a symlink whose target stays beneath the root is followed
//!   (`docs -> ../shared/docs` in a monorepo works); an absolute symlink, or one that leads out,
//!   is refused (`ROOT`) even if it happens to point back inside.
//! - With the fallback walk (older kernels, or a seccomp filter that blocks `openat2`): every
//!   component is opened with `O_NOFOLLOW`, so **every** symlink is refused (`ROOT`). Following
//!   symlinks safely in user space means re-implementing the kernel's beneath check; refusing is
//!   the smaller and safer code. The error says why, so an operator who hits it knows.
//! - The *last* component of a mutation (`mkdir`, `rmdir`, `rename`) is never resolved: the
//!   operation works on the directory entry itself, so `rename` moves a symlink, not its target,
//!   and `rmdir` of a symlink is "not a directory".
//!
//! # Error codes
//!
//! [`GuardError::wire_code`] maps every failure to the 0.1.x codes: `PATH` (bad relative path,
//! missing target, wrong kind of file), `ROOT` (unknown alias, escape attempt, symlink refused,
//! permission denied, operating on the root itself), `INTERNAL` (anything else: the daemon or
//! host is in a state we did not expect). Messages name the relative path, never the host's
//! absolute path, and say what to do.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use codemantle_protocol::error::ErrorCode;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};

/// Longest single path component, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Longest relative path accepted from the wire, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// How many times an `openat2` that failed with `EAGAIN` is retried. The kernel returns
/// `EAGAIN` under `RESOLVE_BENEATH` when a concurrent rename or mount might have moved a `..`;
/// retrying is what the man page prescribes.
const OPENAT2_EAGAIN_RETRIES: usize = 16;

// `openat2(2)` ABI, from `linux/openat2.h`. Defined here rather than taken from libc so the
// same code builds for glibc and musl targets alike.
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_BENEATH: u64 = 0x08;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Which path-resolution strategy a [`RootDir`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// Probe at open: `Openat2` if the kernel has it, else `Walk`.
    Auto,
    /// `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: one syscall, in-tree symlinks followed.
    Openat2,
    /// Per-component `openat(O_NOFOLLOW)`: for kernels before 5.6; every symlink refused.
    Walk,
}

/// Why a path operation was refused or failed. See the module doc for the rules.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The relative path began with `/`.
    #[error("`{path}` is an absolute path — send a path relative to the root, e.g. `src/main.rs`")]
    Absolute { path: String },
    /// The relative path contained a NUL byte.
    #[error("path contains a NUL byte — file names cannot contain NUL; fix the sender")]
    NulByte,
    /// A component was longer than [`MAX_COMPONENT_BYTES`].
    #[error(
        "a component of `{path}` is {len} bytes long — the limit is {MAX_COMPONENT_BYTES} bytes per name"
    )]
    ComponentTooLong { path: String, len: usize },
    /// The whole path was longer than [`MAX_PATH_BYTES`].
    #[error("path is {len} bytes long — the limit is {MAX_PATH_BYTES} bytes")]
    PathTooLong { len: usize },
    /// An argument other than the path was unusable (a cursor, a move into itself...).
    #[error("{what}")]
    InvalidArgument { what: String },
    /// The target (or one of its parents) does not exist.
    #[error("`{path}`: no such file or directory — check the path and list the parent directory")]
    NotFound { path: String },
    /// A directory was required (as the target or as a parent) and something else was found.
    #[error("`{path}`: not a directory")]
    NotADirectory { path: String },
    /// A non-directory was required and a directory was found.
    #[error("`{path}`: is a directory")]
    IsADirectory { path: String },
    /// The target already exists (mkdir over a file, rename without overwrite).
    #[error("`{path}`: already exists — choose another name, or ask for overwrite")]
    AlreadyExists { path: String },
    /// The directory is not empty (non-recursive rmdir, rename over a full directory).
    #[error(
        "`{path}`: directory is not empty — remove its contents first, or ask for a recursive remove"
    )]
    NotEmpty { path: String },
    /// The operation would cross into another filesystem (rename across mounts, recursive
    /// remove reaching a mount point).
    #[error(
        "`{path}`: is on another filesystem (a mount point) — the daemon does not cross mounts for this operation"
    )]
    OtherFilesystem { path: String },
    /// Recursive removal went deeper than the daemon allows.
    #[error("`{path}`: directory tree is deeper than {max} levels — remove it in parts")]
    TooDeep { path: String, max: usize },
    /// The root alias is not configured.
    #[error("unknown root `{alias}` — configured roots are set under [roots] in the daemon config")]
    UnknownRoot { alias: String },
    /// The root itself could not be opened (configuration or host problem).
    #[error("root `{alias}` ({path}) cannot be used: {reason}")]
    InvalidRoot {
        alias: String,
        path: String,
        reason: String,
    },
    /// The path tried to leave the root (`..` above it, or a symlink leading out).
    #[error(
        "`{path}` leads outside the root — paths (and symlinks in them) must stay inside the root"
    )]
    Escape { path: String },
    /// A symlink was met where the daemon does not follow one.
    #[error("`{path}` is or goes through a symlink the daemon will not follow{why}")]
    Symlink { path: String, why: &'static str },
    /// The operation would act on the root directory itself.
    #[error("refusing to {op} the root directory itself")]
    IsRoot { op: &'static str },
    /// The host refused access (`EACCES`/`EPERM`).
    #[error("`{path}`: permission denied — the daemon's user cannot access it")]
    PermissionDenied { path: String },
    /// Any other system error.
    #[error("`{path}`: {op} failed: {errno}")]
    Io {
        op: &'static str,
        path: String,
        errno: Errno,
    },
}

impl GuardError {
    /// The wire error code for this failure: [`ErrorCode::Path`], [`ErrorCode::Root`] or
    /// [`ErrorCode::Internal`] (see the module doc for which is which).
    pub fn wire_code(&self) -> ErrorCode {
        use GuardError::*;
        match self {
            Absolute { .. }
            | NulByte
            | ComponentTooLong { .. }
            | PathTooLong { .. }
            | InvalidArgument { .. }
            | NotFound { .. }
            | NotADirectory { .. }
            | IsADirectory { .. }
            | AlreadyExists { .. }
            | NotEmpty { .. }
            | OtherFilesystem { .. }
            | TooDeep { .. } => ErrorCode::Path,
            UnknownRoot { .. }
            | InvalidRoot { .. }
            | Escape { .. }
            | Symlink { .. }
            | IsRoot { .. }
            | PermissionDenied { .. } => ErrorCode::Root,
            Io { .. } => ErrorCode::Internal,
        }
    }

    /// Map an errno from a filesystem call on `path` (not from resolution) to a typed error.
    pub(crate) fn from_errno(op: &'static str, path: &str, errno: Errno) -> GuardError {
        let path = shown(path);
        match errno {
            Errno::ENOENT => GuardError::NotFound { path },
            Errno::ENOTDIR => GuardError::NotADirectory { path },
            Errno::EISDIR => GuardError::IsADirectory { path },
            Errno::EEXIST => GuardError::AlreadyExists { path },
            Errno::ENOTEMPTY => GuardError::NotEmpty { path },
            Errno::EXDEV => GuardError::OtherFilesystem { path },
            Errno::EACCES | Errno::EPERM => GuardError::PermissionDenied { path },
            Errno::ELOOP => GuardError::Symlink { path, why: "" },
            Errno::ENAMETOOLONG => GuardError::PathTooLong { len: path.len() },
            errno => GuardError::Io { op, path, errno },
        }
    }
}

/// Shorten wire input for messages and logs: paths can be 4 KiB of attacker-chosen text.
fn shown(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A validated, lexically normalised path relative to a root. The empty path is the root.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelPath {
    comps: Vec<String>,
}

impl RelPath {
    /// Parse a relative path from the wire. See the module doc for the rules.
    pub fn parse(input: &str) -> Result<RelPath, GuardError> {
        if input.len() > MAX_PATH_BYTES {
            return Err(GuardError::PathTooLong { len: input.len() });
        }
        if input.as_bytes().contains(&0) {
            return Err(GuardError::NulByte);
        }
        if input.starts_with('/') {
            return Err(GuardError::Absolute { path: shown(input) });
        }
        let mut comps: Vec<String> = Vec::new();
        for comp in input.split('/') {
            match comp {
                "" | "." => {}
                ".." => {
                    if comps.pop().is_none() {
                        return Err(GuardError::Escape { path: shown(input) });
                    }
                }
                name => {
                    if name.len() > MAX_COMPONENT_BYTES {
                        return Err(GuardError::ComponentTooLong {
                            path: shown(input),
                            len: name.len(),
                        });
                    }
                    comps.push(name.to_owned());
                }
            }
        }
        Ok(RelPath { comps })
    }

    /// The root itself.
    pub fn root() -> RelPath {
        RelPath { comps: Vec::new() }
    }

    /// Whether this names the root itself.
    pub fn is_root(&self) -> bool {
        self.comps.is_empty()
    }

    /// The normalised components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.comps.iter().map(String::as_str)
    }

    /// The parent and the last component, or `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &str)> {
        let (last, parent) = self.comps.split_last()?;
        Some((
            RelPath {
                comps: parent.to_vec(),
            },
            last.as_str(),
        ))
    }

    /// Whether `self` is `prefix` or lies beneath it (component-wise, lexical).
    pub fn starts_with(&self, prefix: &RelPath) -> bool {
        self.comps.len() >= prefix.comps.len() && self.comps[..prefix.comps.len()] == prefix.comps
    }

    /// The path as the kernel will see it: `a/b/c`, or `.` for the root.
    fn for_kernel(&self) -> String {
        if self.is_root() {
            ".".to_owned()
        } else {
            self.comps.join("/")
        }
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shown(&self.for_kernel()))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", self.for_kernel())
    }
}

fn cstring(s: &str) -> Result<CString, GuardError> {
    CString::new(s).map_err(|_| GuardError::NulByte)
}

/// A configured root, held open as an `O_PATH|O_DIRECTORY` fd. All access beneath it is
/// resolved from this fd (see the module doc).
///
/// The fd pins the directory: if the operator renames or replaces the root path on the host
/// while the daemon runs, the daemon keeps serving the directory it opened at start.
pub struct RootDir {
    alias: String,
    path: PathBuf,
    fd: OwnedFd,
    resolver: Resolver,
}

impl fmt::Debug for RootDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootDir")
            .field("alias", &self.alias)
            .field("path", &self.path)
            .field("resolver", &self.resolver)
            .finish()
    }
}

impl RootDir {
    /// Open a root, choosing the resolver by probing the kernel ([`Resolver::Auto`]).
    pub fn open(alias: &str, path: &Path) -> Result<RootDir, GuardError> {
        RootDir::open_with(alias, path, Resolver::Auto)
    }

    /// Open a root with an explicit resolver. Forcing [`Resolver::Walk`] is how the tests
    /// exercise the fallback on a modern kernel; forcing [`Resolver::Openat2`] fails if the
    /// kernel lacks it.
    pub fn open_with(alias: &str, path: &Path, resolver: Resolver) -> Result<RootDir, GuardError> {
        let invalid = |reason: String| GuardError::InvalidRoot {
            alias: alias.to_owned(),
            path: path.display().to_string(),
            reason,
        };
        if !path.is_absolute() {
            return Err(invalid(
                "the root must be an absolute path — fix it in [roots]".to_owned(),
            ));
        }
        // The root path itself is the operator's configuration, not wire input: symlinks in it
        // are the operator's choice and are followed here, once.
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            invalid(match e {
                Errno::ENOENT => "it does not exist — create it or fix [roots]".to_owned(),
                Errno::ENOTDIR => "it is not a directory — fix [roots]".to_owned(),
                Errno::EACCES | Errno::EPERM => {
                    "permission denied — give the daemon's user access to it".to_owned()
                }
                e => format!("open failed: {e}"),
            })
        })?;
        let resolver = match resolver {
            Resolver::Walk => Resolver::Walk,
            Resolver::Auto | Resolver::Openat2 => match openat2(
                fd.as_fd(),
                ".",
                OFlag::O_PATH | OFlag::O_DIRECTORY,
                Mode::empty(),
            ) {
                Ok(_) => Resolver::Openat2,
                // ENOSYS: kernel < 5.6. EPERM: a seccomp filter (older container runtimes)
                // blocks the syscall; opening "." beneath our own fd is never a real EPERM.
                Err(Errno::ENOSYS | Errno::EPERM) if resolver == Resolver::Auto => {
                    tracing::info!(
                        root = alias,
                        "openat2 is unavailable (kernel < 5.6 or blocked by seccomp); using the per-component walk, which refuses every symlink"
                    );
                    Resolver::Walk
                }
                Err(e) => return Err(invalid(format!("openat2 probe failed: {e}"))),
            },
        };
        Ok(RootDir {
            alias: alias.to_owned(),
            path: path.to_owned(),
            fd,
            resolver,
        })
    }

    /// The root's alias (`cwd`, ...).
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The host path the root was opened from. For logs and local diagnostics only; never
    /// resolve anything by string from it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The resolver in use ([`Resolver::Openat2`] or [`Resolver::Walk`], never `Auto`).
    pub fn resolver(&self) -> Resolver {
        self.resolver
    }

    /// The root directory fd (`O_PATH`).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Open a directory beneath the root for reading its entries (`O_RDONLY|O_DIRECTORY`).
    pub fn open_dir(&self, rel: &RelPath) -> Result<OwnedFd, GuardError> {
        self.open_beneath(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
    }

    /// Open the parent directory of `rel` (`O_PATH|O_DIRECTORY`) and return it with the last
    /// component, which is *not* resolved: `*at` calls on (fd, name) act on the entry itself.
    pub fn open_parent<'a>(&self, rel: &'a RelPath) -> Result<(OwnedFd, &'a str), GuardError> {
        let (parent, name) = rel.split_last().ok_or(GuardError::IsRoot {
            op: "address the parent of",
        })?;
        let fd = self.open_beneath(&parent, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty())?;
        Ok((fd, name))
    }

    /// Open `rel` beneath the root with `flags` (`O_CLOEXEC` is always added; `mode` only
    /// matters with `O_CREAT`). Add `O_NOFOLLOW` to refuse a symlink as the last component.
    pub fn open_beneath(
        &self,
        rel: &RelPath,
        flags: OFlag,
        mode: Mode,
    ) -> Result<OwnedFd, GuardError> {
        match self.resolver {
            Resolver::Walk => self.open_walk(rel, flags, mode),
            Resolver::Openat2 | Resolver::Auto => {
                openat2(self.fd.as_fd(), &rel.for_kernel(), flags, mode)
                    .map_err(|e| resolve_error(rel, e, ""))
            }
        }
    }

    /// The fallback: one `openat(O_NOFOLLOW)` per component, starting from the root fd. `..`
    /// never reaches here ([`RelPath::parse`] removed it), and `O_NOFOLLOW` refuses symlinks,
    /// so every step stays beneath the previous one.
    fn open_walk(&self, rel: &RelPath, flags: OFlag, mode: Mode) -> Result<OwnedFd, GuardError> {
        let flags = flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let Some((last, dirs)) = rel.comps.split_last() else {
            return nix::fcntl::openat(self.fd.as_fd(), ".", flags, mode)
                .map_err(|e| resolve_error(rel, e, WALK_WHY));
        };
        let mut cur: Option<OwnedFd> = None;
        let mut walked = String::new();
        for comp in dirs {
            if !walked.is_empty() {
                walked.push('/');
            }
            walked.push_str(comp);
            let at = cur.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
            let name = cstring(comp)?;
            let next = nix::fcntl::openat(
                at,
                name.as_c_str(),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| walk_error(at, &name, &walked, e))?;
            cur = Some(next);
        }
        let at = cur.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
        let name = cstring(last)?;
        let fd = nix::fcntl::openat(at, name.as_c_str(), flags, mode)
            .map_err(|e| walk_error(at, &name, &rel.for_kernel(), e))?;
        // O_PATH|O_NOFOLLOW without O_DIRECTORY opens a symlink itself instead of failing.
        if flags.contains(OFlag::O_PATH) && !flags.contains(OFlag::O_DIRECTORY) {
            let st = nix::sys::stat::fstat(&fd).map_err(|e| resolve_error(rel, e, WALK_WHY))?;
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
                return Err(GuardError::Symlink {
                    path: rel.to_string(),
                    why: WALK_WHY,
                });
            }
        }
        Ok(fd)
    }
}

const WALK_WHY: &str = " (this host's kernel lacks openat2, Linux < 5.6, so the daemon refuses every symlink in a path)";

/// Map an errno from resolving `rel` (openat2 or the walk's last step).
fn resolve_error(rel: &RelPath, errno: Errno, why: &'static str) -> GuardError {
    match errno {
        // RESOLVE_BENEATH's refusal: `..` above the root, absolute or escaping symlink.
        Errno::EXDEV => GuardError::Escape {
            path: rel.to_string(),
        },
        Errno::ELOOP => GuardError::Symlink {
            path: rel.to_string(),
            why,
        },
        errno => GuardError::from_errno("open", &rel.for_kernel(), errno),
    }
}

/// Map an errno from one step of the walk; `ENOTDIR` there may be a refused symlink.
fn walk_error(at: BorrowedFd<'_>, name: &CString, walked: &str, errno: Errno) -> GuardError {
    if matches!(errno, Errno::ENOTDIR | Errno::ELOOP) {
        // Advisory only (it names the right error); the refusal itself came from O_NOFOLLOW.
        let is_link = nix::sys::stat::fstatat(at, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
            .unwrap_or(false);
        if is_link || errno == Errno::ELOOP {
            return GuardError::Symlink {
                path: shown(walked),
                why: WALK_WHY,
            };
        }
    }
    GuardError::from_errno("open", walked, errno)
}

/// `openat2(dirfd, path, {flags|O_CLOEXEC, mode, RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS})`.
fn openat2(dirfd: BorrowedFd<'_>, path: &str, flags: OFlag, mode: Mode) -> Result<OwnedFd, Errno> {
    let cpath = CString::new(path).map_err(|_| Errno::EINVAL)?;
    let flags = flags | OFlag::O_CLOEXEC;
    // The kernel rejects a non-zero mode without O_CREAT/O_TMPFILE.
    let mode = if flags.intersects(OFlag::O_CREAT | OFlag::O_TMPFILE) {
        u64::from(mode.bits())
    } else {
        0
    };
    let how = OpenHow {
        // The open flags are a C int; sign-extending a negative one would set unknown high
        // bits, which the kernel rejects, so go through u32.
        flags: u64::from(flags.bits() as u32),
        mode,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    for _ in 0..OPENAT2_EAGAIN_RETRIES {
        // SAFETY: `cpath` is a valid NUL-terminated string and `how` a valid `open_how` of the
        // size we pass; both outlive the call. The kernel returns a new fd or -1.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd.as_raw_fd(),
                cpath.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if ret >= 0 {
            // `ret` is a c_long: i64 on 64-bit targets, i32 on 32-bit ARM.
            #[allow(irrefutable_let_patterns)]
            let Ok(raw) = i32::try_from(ret) else {
                return Err(Errno::EOVERFLOW);
            };
            // SAFETY: a non-negative return from openat2 is a new fd that we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        match Errno::last() {
            Errno::EAGAIN | Errno::EINTR => continue,
            e => return Err(e),
        }
    }
    Err(Errno::EAGAIN)
}

/// All configured roots, by alias.
#[derive(Debug, Default)]
pub struct Roots {
    roots: BTreeMap<String, RootDir>,
}

impl Roots {
    /// Open every configured root (alias → absolute directory).
    pub fn open(config: &BTreeMap<String, PathBuf>) -> Result<Roots, GuardError> {
        Roots::open_with(config, Resolver::Auto)
    }

    /// Like [`Roots::open`] with an explicit resolver.
    pub fn open_with(
        config: &BTreeMap<String, PathBuf>,
        resolver: Resolver,
    ) -> Result<Roots, GuardError> {
        let mut roots = BTreeMap::new();
        for (alias, path) in config {
            roots.insert(alias.clone(), RootDir::open_with(alias, path, resolver)?);
        }
        Ok(Roots { roots })
    }

    /// The root for a wire alias, or [`GuardError::UnknownRoot`] (`ROOT`).
    pub fn get(&self, alias: &str) -> Result<&RootDir, GuardError> {
        self.roots
            .get(alias)
            .ok_or_else(|| GuardError::UnknownRoot {
                alias: shown(alias),
            })
    }

    /// Iterate the roots in alias order.
    pub fn iter(&self) -> impl Iterator<Item = &RootDir> {
        self.roots.values()
    }
}

/// A directory entry name from `readdir`, as a C string for `*at` calls.
pub(crate) fn name_cstr(name: &[u8]) -> Result<CString, GuardError> {
    CString::new(name).map_err(|_| GuardError::NulByte)
}

/// Lossy display of a raw name (for messages about non-UTF-8 names).
pub(crate) fn lossy(name: &[u8]) -> String {
    OsStr::from_bytes(name).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> Vec<String> {
        RelPath::parse(s)
            .unwrap()
            .components()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn normalises_lexically() {
        assert!(RelPath::parse("").unwrap().is_root());
        assert!(RelPath::parse(".").unwrap().is_root());
        assert!(RelPath::parse("./").unwrap().is_root());
        assert!(RelPath::parse("a/..").unwrap().is_root());
        assert_eq!(parts("a//b/./c/"), ["a", "b", "c"]);
        assert_eq!(parts("a/../b"), ["b"]);
        assert_eq!(parts("a/b/../../c"), ["c"]);
        assert_eq!(parts("..."), ["..."]);
        assert_eq!(parts("a\\b"), ["a\\b"]);
        assert_eq!(parts(" a "), [" a "]);
    }

    #[test]
    fn rejects_bad_paths_with_codes() {
        let code = |s: &str| {
            RelPath::parse(s)
                .unwrap_err()
                .wire_code()
                .as_str()
                .to_owned()
        };
        assert_eq!(code("/etc/passwd"), "PATH");
        assert_eq!(code("a\0b"), "PATH");
        assert_eq!(code(".."), "ROOT");
        assert_eq!(code("../x"), "ROOT");
        assert_eq!(code("a/../../x"), "ROOT");
        assert_eq!(code(&"x".repeat(256)), "PATH");
        assert!(RelPath::parse(&"x".repeat(255)).is_ok());
        assert_eq!(code(&"a/".repeat(2049)), "PATH");
        assert!(matches!(
            RelPath::parse(&"a/".repeat(2049)),
            Err(GuardError::PathTooLong { len: 4098 })
        ));
    }

    #[test]
    fn prefix_and_split() {
        let a = RelPath::parse("a/b").unwrap();
        let ab = RelPath::parse("a/b/c").unwrap();
        assert!(ab.starts_with(&a));
        assert!(!a.starts_with(&ab));
        assert!(!RelPath::parse("a/bc").unwrap().starts_with(&a));
        let (parent, last) = ab.split_last().unwrap();
        assert_eq!(parent, a);
        assert_eq!(last, "c");
        assert!(RelPath::root().split_last().is_none());
    }

    #[test]
    fn shareable_across_request_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<RootDir>();
        send_sync::<Roots>();
        send_sync::<crate::journal::Journal>();
    }

    #[test]
    fn shown_truncates_on_char_boundary() {
        let s = "é".repeat(300);
        let t = shown(&s);
        assert!(t.len() <= 204);
        assert!(t.ends_with('…'));
    }
}
