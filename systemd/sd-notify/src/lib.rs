//! systemd service notifications (`sd_notify(3)`) without libsystemd.
//!
//! Both binaries run as `Type=notify` units: they say `READY=1` once their configuration is
//! valid and their store is open, and `WATCHDOG=1` at half the `WatchdogSec` interval while
//! their event loop is alive. The protocol is one Unix datagram per notification to the socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace), so it is a few
//! lines of std rather than a C dependency that would complicate ARM cross builds.
//!
//! Outside systemd (`$NOTIFY_SOCKET` unset) every call is a cheap no-op.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go; `None` when the process is not supervised by systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|s| parse_target(&s));
        let watchdog = watchdog_from(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Notifier { target, watchdog }
    }

    /// A notifier sending to an explicit socket path (tests and embedding).
    pub fn to_path(path: impl Into<std::path::PathBuf>, watchdog: Option<Duration>) -> Self {
        Notifier {
            target: Some(Target::Path(path.into())),
            watchdog,
        }
    }

    /// True when running under systemd with a notification socket.
    pub fn is_supervised(&self) -> bool {
        self.target.is_some()
    }

    /// How often to call [`Notifier::watchdog`]: half the unit's `WatchdogSec`, or `None` when
    /// no watchdog is configured for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// `READY=1` plus a human-readable status line shown by `systemctl status`.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)))
    }

    /// `WATCHDOG=1`: the event loop is alive.
    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1\n")
    }

    /// `STATUS=...` alone.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}\n", one_line(status)))
    }

    /// `STOPPING=1` before an orderly shutdown.
    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1\n")
    }

    fn send(&self, msg: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let sock = UnixDatagram::unbound()?;
        match target {
            Target::Path(p) => sock.send_to(msg.as_bytes(), p).map(|_| ()),
            Target::Abstract(name) => send_abstract(&sock, name, msg.as_bytes()),
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn parse_target(s: &std::ffi::OsStr) -> Option<Target> {
    use std::os::unix::ffi::OsStrExt;
    let b = s.as_bytes();
    match b.first()? {
        b'/' => Some(Target::Path(std::path::PathBuf::from(s))),
        b'@' if b.len() > 1 => Some(Target::Abstract(b[1..].to_vec())),
        _ => None,
    }
}

/// `WATCHDOG_USEC` applies to us only if `WATCHDOG_PID` is unset or names this process.
fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

#[cfg(target_os = "linux")]
fn send_abstract(sock: &UnixDatagram, name: &[u8], msg: &[u8]) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(msg, &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets need Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_watchdog_reach_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to_path(&path, Some(Duration::from_secs(30)));
        n.ready("connected to cp.example:8787\nsecond line")
            .unwrap();
        n.watchdog().unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "READY=1\nSTATUS=connected to cp.example:8787 second line\n"
        );
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
    }

    #[test]
    fn abstract_socket_target() {
        let name = format!("codemantle-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            target: parse_target(std::ffi::OsStr::new(&format!("@{name}"))),
            watchdog: None,
        };
        n.stopping().unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\n");
    }

    #[test]
    fn unsupervised_is_a_no_op() {
        let n = Notifier {
            target: None,
            watchdog: None,
        };
        assert!(!n.is_supervised());
        n.ready("x").unwrap();
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn watchdog_env_rules() {
        assert_eq!(
            watchdog_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("junk"), None, 7), None);
        assert_eq!(watchdog_from(None, None, 7), None);
        assert!(parse_target(std::ffi::OsStr::new("relative")).is_none());
        assert!(parse_target(std::ffi::OsStr::new("@")).is_none());
    }
}
