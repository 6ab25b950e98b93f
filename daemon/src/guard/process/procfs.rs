//! `/proc` reading for process identity: a pid alone names a process only until it is reaped;
//! after that the kernel may hand the same number to any new process. A process is therefore
//! identified by **(pid, start time)**: the start time (field 22 of `/proc/PID/stat`, clock ticks
//! since boot) is fixed at fork and never changes, and two processes that ever held the same pid
//! cannot have started at the same tick.
//!
//! Everything here is read-only and best-effort: a process can exit between two reads, so every
//! function answers for the instant it looked.

use std::io::Read as _;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// What `/proc/PID/stat` says about a process (the fields we use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: u8,
    /// Field 4.
    pub ppid: i32,
    /// Field 5: process group.
    pub pgrp: i32,
    /// Field 6: session.
    pub session: i32,
    /// Field 22: start time, clock ticks after boot.
    pub start_time: u64,
}

impl ProcStat {
    /// A zombie or dead entry: the process has exited, only its parent has not reaped it yet.
    pub fn has_exited(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parse the text of `/proc/PID/stat`. The second field (`comm`, in parentheses) may contain
/// spaces and parentheses itself, so the fields are counted from the **last** `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    // `after` starts with " S ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime ...":
    // field 3 is index 0 here, so field N is index N - 3.
    let fields: Vec<&str> = after.split_ascii_whitespace().collect();
    let state = *fields.first()?.as_bytes().first()?;
    Some(ProcStat {
        state,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// `/proc/PID/stat` of `pid`, or `None` if there is no such process (or `/proc` is unreadable).
pub fn read_stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    let mut text = String::new();
    std::fs::File::open(format!("/proc/{pid}/stat"))
        .ok()?
        .take(4096)
        .read_to_string(&mut text)
        .ok()?;
    parse_stat(&text)
}

/// The start time (clock ticks after boot) of `pid`, if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    read_stat(pid).map(|s| s.start_time)
}

/// Whether the process `pid` that started at `start_time` is still running. False if the pid
/// is gone, belongs to another (newer) process, or is a zombie waiting to be reaped.
pub fn is_alive(pid: i32, start_time: u64) -> bool {
    read_stat(pid).is_some_and(|s| s.start_time == start_time && !s.has_exited())
}

/// What [`kill_group`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSignal {
    /// The signal was sent to the process group.
    Sent,
    /// Neither the leader nor any member of the group exists any more: nothing to signal.
    AlreadyGone,
}

/// Why [`kill_group`] refused or failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KillGroupError {
    /// pgid 0 or 1 (or negative) would signal our own group, init, or everything.
    #[error("refusing to signal process group {pgid}: not a session's group")]
    InvalidGroup { pgid: i32 },
    /// The pid is now used by a different process, so the number no longer names our group.
    #[error(
        "process group {pgid} is not ours any more: pid {pgid} now belongs to a process started at tick {found}, not {expected} — the session already ended; drop it from the registry"
    )]
    Recycled {
        pgid: i32,
        expected: u64,
        found: u64,
    },
    /// `killpg` failed (`EPERM`: the group runs as a user the daemon may not signal).
    #[error("signalling process group {pgid} failed: {errno}")]
    Kill { pgid: i32, errno: Errno },
}

/// Send `signal` to the process group `pgid`, whose leader (a child the guard spawned; its pid is
/// the pgid because the child called `setsid`) started at `leader_start_time`.
///
/// A bare `killpg(pgid)` is only safe while the number still names our group. The rules:
///
/// - the leader exists with the same start time (running or zombie) → ours: `killpg`;
/// - the pid exists with a *different* start time → the number was recycled, which the kernel
///   only does after our whole group was gone: refuse ([`KillGroupError::Recycled`]);
/// - the leader is gone but some process still has `pgrp == pgid` → ours (a pid stays reserved
///   while any process uses it as its group id, so no new group can have taken it): `killpg`;
/// - nothing has that group → [`GroupSignal::AlreadyGone`].
///
/// The leader may not have reached `setsid` yet (a few microseconds after fork); if `killpg`
/// finds no group while the leader exists, the leader itself is signalled.
pub fn kill_group(
    pgid: i32,
    leader_start_time: u64,
    signal: Signal,
) -> Result<GroupSignal, KillGroupError> {
    if pgid <= 1 {
        return Err(KillGroupError::InvalidGroup { pgid });
    }
    match read_stat(pgid) {
        Some(leader) if leader.start_time != leader_start_time => Err(KillGroupError::Recycled {
            pgid,
            expected: leader_start_time,
            found: leader.start_time,
        }),
        Some(_) => match nix::sys::signal::killpg(Pid::from_raw(pgid), signal) {
            Ok(()) => Ok(GroupSignal::Sent),
            Err(Errno::ESRCH) => match nix::sys::signal::kill(Pid::from_raw(pgid), signal) {
                Ok(()) => Ok(GroupSignal::Sent),
                Err(Errno::ESRCH) => Ok(GroupSignal::AlreadyGone),
                Err(errno) => Err(KillGroupError::Kill { pgid, errno }),
            },
            Err(errno) => Err(KillGroupError::Kill { pgid, errno }),
        },
        None => {
            if !group_has_members(pgid) {
                return Ok(GroupSignal::AlreadyGone);
            }
            match nix::sys::signal::killpg(Pid::from_raw(pgid), signal) {
                Ok(()) => Ok(GroupSignal::Sent),
                Err(Errno::ESRCH) => Ok(GroupSignal::AlreadyGone),
                Err(errno) => Err(KillGroupError::Kill { pgid, errno }),
            }
        }
    }
}

/// The pids of the live (not zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| read_stat(pid).is_some_and(|s| s.pgrp == pgid && !s.has_exited()))
        .collect()
}

fn group_has_members(pgid: i32) -> bool {
    !group_members(pgid).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let line = "1234 (a) b (c) d) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, b'S');
        assert_eq!((s.ppid, s.pgrp, s.session), (1, 1234, 1234));
        assert_eq!(s.start_time, 98765);
        assert!(parse_stat("1234 (x").is_none());
        assert!(parse_stat("1234 (x) S 1 2").is_none());
    }

    #[test]
    fn own_process() {
        let me = std::process::id() as i32;
        let st = read_stat(me).unwrap();
        assert!(is_alive(me, st.start_time));
        assert!(!is_alive(me, st.start_time + 1));
        assert!(!is_alive(-1, 0));
        assert_eq!(
            kill_group(1, 0, Signal::SIGTERM),
            Err(KillGroupError::InvalidGroup { pgid: 1 })
        );
        assert_eq!(
            kill_group(0, 0, Signal::SIGTERM),
            Err(KillGroupError::InvalidGroup { pgid: 0 })
        );
    }
}
