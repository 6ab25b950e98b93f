//! Fault injection for the `fault_*` tests: signals to our own child processes, a small tmpfs
//! inside a temp dir (disk full), and network namespaces joined by a veth pair (partitions).
//!
//! # Safety rules (the tests run as root on shared machines)
//!
//! - A [`Tmpfs`] is mounted only on a directory this module just created inside its own
//!   [`tempfile::TempDir`], and unmounted when it is dropped (lazily if it is still busy) before
//!   the temp dir is removed. Nothing here writes outside temp dirs.
//! - A [`NetNs`] has a unique name (`cmtest-<pid>-<n>-<tag>`) and is deleted when dropped.
//!   Veth pairs are created directly inside our namespaces ([`NetNs::veth_pair`]) and get only
//!   the addresses the test assigns there: no default route, no forwarding, nothing on the
//!   host's own interfaces, routes or firewall.
//! - Signals go only to process ids of children the harness started ([`signal`] refuses
//!   anything else it can check: pid 0, 1 and our own process).
//!
//! Every setup step that needs root (mount, `ip netns`) returns an error saying what failed,
//! so a test without the privilege fails with that message instead of passing.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Sends `sig` to the child process `pid` (from `Daemon::pid` / `ControlPlane::pid`).
pub fn signal(pid: u32, sig: libc::c_int) {
    let own = std::process::id();
    assert!(pid > 1 && pid != own, "refusing to signal pid {pid}");
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) with a pid of our own child and a valid signal number.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        io::Error::last_os_error()
    );
}

/// Stops (`SIGSTOP`) a child: it keeps its sockets but does nothing, like a hung host.
pub fn freeze(pid: u32) {
    signal(pid, libc::SIGSTOP);
}

/// Resumes a child stopped with [`freeze`].
pub fn thaw(pid: u32) {
    signal(pid, libc::SIGCONT);
}

/// Raises this process's open-file limit to its hard limit (children inherit it): a fleet of N
/// simulated daemons needs N descriptors here and N in the control plane. Returns the limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a zeroed struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        lim.rlim_cur
    }
}

/// Bytes waiting unread in the receive queues of `pid`'s TCP sockets connected to
/// `remote_port` (from `/proc/<pid>/fd` and `/proc/<pid>/net/tcp{,6}`), or `None` if it has
/// none. With the process stopped ([`freeze`]), this grows when a frame is sent to it.
pub fn tcp_rx_queue(pid: u32, remote_port: u16) -> Option<u64> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let mut total = None;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(rem), Some(queues), Some(inode)) = (f.get(2), f.get(4), f.get(9)) else {
                continue;
            };
            let port = rem
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if port != Some(remote_port) || !inodes.contains(*inode) {
                continue;
            }
            let rx = queues
                .split_once(':')
                .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                .unwrap_or(0);
            *total.get_or_insert(0) += rx;
        }
    }
    total
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with NUL"))
}

/// Free bytes on the filesystem holding `path` for an unprivileged writer (`f_bavail`).
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = cstring(path)?;
    // SAFETY: statvfs into a zeroed struct we own, with a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field widths differ between targets
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// A tmpfs of a fixed size mounted on `<temp dir>/mnt`; unmounted on drop.
pub struct Tmpfs {
    mountpoint: PathBuf,
    // Dropped after `Drop::drop` unmounted: removes the (then empty) mountpoint and dir.
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` (mode 0700) on a fresh directory inside a new temp dir.
    pub fn mount(size_bytes: u64) -> io::Result<Tmpfs> {
        let dir = tempfile::Builder::new().prefix("cmtest-tmpfs-").tempdir()?;
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint)?;
        // Belt and braces: only ever a real directory we just created under the temp dir.
        let meta = std::fs::symlink_metadata(&mountpoint)?;
        assert!(meta.is_dir() && mountpoint.starts_with(dir.path()));
        let target = cstring(&mountpoint)?;
        let source = CString::new("cmtest-tmpfs").expect("no NUL");
        let fstype = CString::new("tmpfs").expect("no NUL");
        let data = CString::new(format!("size={size_bytes},mode=0700")).expect("no NUL");
        // SAFETY: mount(2) with valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "mounting a tmpfs on {} failed: {e} (needs root / CAP_SYS_ADMIN)",
                    mountpoint.display()
                ),
            ));
        }
        Ok(Tmpfs {
            mountpoint,
            _dir: dir,
        })
    }

    /// The mounted directory.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Free bytes left on it.
    pub fn free_bytes(&self) -> u64 {
        free_bytes(&self.mountpoint).expect("statvfs on the tmpfs")
    }

    /// Writes zeros to `name` on the tmpfs until it is full (`ENOSPC`); returns the file's path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write as _;
        let path = self.mountpoint.join(name);
        let mut f = std::fs::File::create_new(&path).expect("create the filler file");
        let chunk = vec![0u8; 64 * 1024];
        let mut small = false;
        loop {
            let buf = if small { &chunk[..4096] } else { &chunk[..] };
            match f.write(buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    if small {
                        break;
                    }
                    small = true;
                }
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let Ok(target) = cstring(&self.mountpoint) else {
            return;
        };
        // SAFETY: umount2(2) on the mountpoint this guard mounted.
        let rc = unsafe { libc::umount2(target.as_ptr(), 0) };
        if rc != 0 {
            // Still busy (a process we failed to kill?): detach it so it goes away with its
            // last user, and leave the directory in place.
            eprintln!(
                "unmounting {} failed ({}); detaching it lazily",
                self.mountpoint.display(),
                io::Error::last_os_error()
            );
            // SAFETY: as above.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`; an error carries its output.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run `ip` ({e}): install iproute2 (the partition test needs it)"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A network namespace of our own (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
    file: std::fs::File,
}

impl NetNs {
    /// Creates `cmtest-<pid>-<n>-<tag>` with its loopback up.
    pub fn create(tag: &str) -> io::Result<NetNs> {
        let name = format!(
            "cmtest-{}-{}-{tag}",
            std::process::id(),
            NETNS_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let file = match std::fs::File::open(Path::new("/run/netns").join(&name)) {
            Ok(f) => f,
            Err(e) => {
                let _ = ip(&["netns", "del", &name]);
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot open /run/netns/{name}: {e}"),
                ));
            }
        };
        let ns = NetNs { name, file };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <this namespace> ARGS`.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Creates a veth pair with one end in each namespace (never in the host's), assigns the
    /// addresses (CIDR, e.g. `10.213.7.1/30`) and brings both ends up.
    pub fn veth_pair(
        a: &NetNs,
        a_if: &str,
        a_addr: &str,
        b: &NetNs,
        b_if: &str,
        b_addr: &str,
    ) -> io::Result<()> {
        ip(&[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ])?;
        a.ip(&["addr", "add", a_addr, "dev", a_if])?;
        b.ip(&["addr", "add", b_addr, "dev", b_if])?;
        a.ip(&["link", "set", a_if, "up"])?;
        b.ip(&["link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Moves the calling thread into this namespace for good: sockets it opens, threads it
    /// spawns and processes it starts from now on live there. Call it first thing in `main`
    /// of a program that should run entirely inside the namespace (e.g. `cm-soak`), before
    /// any other thread exists.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: setns(2) on the calling thread with a namespace fd we keep open.
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("setns into {} failed: {e}", self.name),
            ));
        }
        Ok(())
    }

    /// Runs `f` on a thread that joined this namespace: sockets it opens and processes it
    /// starts live in the namespace. Other threads are not affected.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns(2) on this thread with a namespace fd we keep open.
                let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into the test namespace failed: {}",
                    io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("{e}");
        }
    }
}
