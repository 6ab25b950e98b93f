//! Running one git command through the process guard: spawn, stream, time out, reap.
//!
//! Why the care: git can hang (a remote that accepts and never answers, a credential prompt
//! it cannot show), can start helpers (`git-remote-https`, `ssh`, `upload-pack`), and can
//! write more than a pipe holds. So:
//!
//! - stdout and stderr are each drained by a blocking reader on smol's pool from the start,
//!   so git never blocks on a full pipe; lines are handed to the async side through a bounded
//!   channel (back-pressure, not unbounded memory), and the bytes kept for parsing are capped;
//! - the deadline covers the whole command. When it passes, the **process group** (git and
//!   every helper it started; the guard made git a session leader) gets SIGTERM, so git can
//!   remove a half-made clone, and SIGKILL [`TERM_GRACE`] later;
//! - after git exits, its output gets [`DRAIN_GRACE`] to finish, and then anything left in
//!   the group is killed, so no helper outlives the request (auto-gc is kept in the
//!   foreground by the hardening prefix for the same reason);
//! - if the operation's future is dropped mid-command, the group is killed
//!   (`KillOnDrop`): a cancelled request leaves nothing running either.
//!
//! `gq` lines are sent in order, each normalised and redacted ([`super::text::log_line`]),
//! at most [`MAX_LOG_LINES`] per command, and all before the command's result returns.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codemantle_protocol::message::{GitLog, GitLogStream};
use futures_lite::future;
use nix::sys::signal::Signal;

use crate::guard::path::RootDir;
use crate::guard::process::{Exit, NetPolicy, PrivateDirs, ProcessGuard, ProcessId, SpawnSpec};

use super::text::{self, log_line, shown_arg};

/// Most output lines sent as `gq` per command (0.1.50's `GIT_LOG_MAX_LINES`).
pub const MAX_LOG_LINES: usize = 200;

/// Time between SIGTERM and SIGKILL when a command times out.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

/// How long output may keep flowing after git itself exited (a helper still holding the
/// pipe) before the rest of the group is killed.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Bytes of stdout kept for parsing (status and branch lists of big repositories fit).
const STDOUT_CAP: usize = 16 << 20;
/// Bytes of stderr kept for the summary.
const STDERR_CAP: usize = 256 << 10;
/// Longest raw line handed to the normaliser (which cuts to 500 units anyway).
const MAX_RAW_LINE: usize = 4096;
/// Lines in flight between a reader and the async side.
const LINE_QUEUE: usize = 64;

/// Where `gq` lines go. Called in order, before the operation returns its result, from the
/// task running the operation: it must not block (queue the frame, e.g. `try_send` on an
/// unbounded or generous channel, and let the link task send it).
pub type LogSink = dyn Fn(GitLog) + Send + Sync;

/// Kills git's process group if the operation's future is dropped before the command ended
/// (the request was cancelled, the link task went away): without it a hung git would outlive
/// its deadline, since the deadline lives in the dropped future.
struct KillOnDrop {
    id: ProcessId,
    armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.armed {
            signal(self.id, Signal::SIGKILL);
        }
    }
}

/// One git invocation.
pub(super) struct GitCommand<'a> {
    /// The arguments after `git` and the hardening prefix, e.g. `["status", "--porcelain=v1"]`.
    pub args: Vec<OsString>,
    /// Working directory (opened through the path guard).
    pub cwd: BorrowedFd<'a>,
    /// Send stdout lines as `gq out` (off for machine-readable output such as `status -z`).
    pub echo_stdout: bool,
}

impl<'a> GitCommand<'a> {
    pub fn new(cwd: BorrowedFd<'a>, args: &[&str]) -> GitCommand<'a> {
        GitCommand {
            args: args.iter().map(OsString::from).collect(),
            cwd,
            echo_stdout: true,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> GitCommand<'a> {
        self.args.push(arg.into());
        self
    }

    pub fn quiet_stdout(mut self) -> GitCommand<'a> {
        self.echo_stdout = false;
        self
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ending {
    Exited(i32),
    Signalled(i32),
    /// The deadline passed and the group was stopped.
    TimedOut(Duration),
    /// The guard refused or failed to start git (the message says why and what to do).
    NotStarted(String),
    /// Waiting for the process failed.
    Lost(String),
}

/// A finished command.
#[derive(Debug)]
pub(super) struct Finished {
    pub ending: Ending,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// stdout was longer than the bytes kept ([`STDOUT_CAP`]); `stdout` is its beginning.
    pub stdout_cut: bool,
}

/// The bytes of one stream kept so far.
#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    /// More arrived than the cap allowed.
    cut: bool,
}

impl Finished {
    pub fn ok(&self) -> bool {
        self.ending == Ending::Exited(0)
    }

    /// Redacted stderr + stdout, ≤ 1200 units; `None` when git said nothing.
    pub fn summary(&self) -> Option<String> {
        let s = text::summary(&self.stderr, &self.stdout);
        (!s.is_empty()).then_some(s)
    }

    /// The failure text of a reply (0.1.50's order: git's own words first, then why it
    /// stopped), or `fallback` (`git_clone_failed`, …) if there is nothing better.
    pub fn failure_text(&self, fallback: &str) -> String {
        let summary = self.summary();
        let why = match &self.ending {
            Ending::Exited(0) => None,
            Ending::TimedOut(t) => Some(format!(
                "git timed out after {} ms and was stopped (with every process it started) — check that the remote answers, or raise the daemon's git timeout",
                t.as_millis()
            )),
            Ending::NotStarted(m) => Some(text::redact(m)),
            Ending::Lost(m) => Some(format!("waiting for git failed: {m}")),
            Ending::Exited(_) | Ending::Signalled(_) if summary.is_some() => None,
            Ending::Exited(code) => Some(format!("Git command failed with exit code {code}")),
            Ending::Signalled(sig) => Some(format!("git was killed by signal {sig}")),
        };
        let joined = match (why, summary) {
            (Some(w), Some(s)) if matches!(self.ending, Ending::TimedOut(_)) => {
                format!("{w}\n{s}")
            }
            (Some(w), _) => w,
            (None, Some(s)) => s,
            (None, None) => fallback.to_owned(),
        };
        text::truncate_units(&joined, text::MAX_SUMMARY_UNITS, "...")
    }
}

/// Everything a command needs besides its own arguments.
pub(super) struct Exec<'a> {
    pub guard: &'a ProcessGuard,
    pub root: &'a RootDir,
    pub private: &'a PrivateDirs,
    /// Global options placed before every subcommand (the hardening prefix).
    pub prefix: &'a [OsString],
    pub env: &'a [(String, OsString)],
    pub timeout: Duration,
    pub request_id: u32,
    pub log: &'a LogSink,
}

enum Event {
    Line(Option<(GitLogStream, String)>),
    Exited(std::io::Result<Exit>),
    Wake,
}

#[derive(Clone, Copy)]
enum Phase {
    Running,
    /// SIGTERM sent; SIGKILL at this instant.
    Terminating(Instant),
    /// git exited; output may flow until this instant.
    Draining(Instant),
}

impl Exec<'_> {
    /// Send one line (normalised; dropped if empty).
    pub fn emit(&self, stream: GitLogStream, line: &str) {
        if let Some(line) = log_line(line) {
            (self.log)(GitLog {
                request_id: self.request_id,
                stream,
                line,
            });
        }
    }

    /// Run `cmd` to completion (or its deadline). Never fails: every way a command can end
    /// is an [`Ending`].
    pub async fn run(&self, cmd: GitCommand<'_>) -> Finished {
        let shown: Vec<String> = cmd
            .args
            .iter()
            .map(|a| shown_arg(&a.to_string_lossy()))
            .collect();
        self.emit(GitLogStream::Meta, &format!("$ git {}", shown.join(" ")));
        let finished = self.run_inner(cmd).await;
        match &finished.ending {
            Ending::Exited(0) => self.emit(GitLogStream::Meta, "git command completed"),
            Ending::TimedOut(_) => {
                self.emit(GitLogStream::Meta, &finished.failure_text("git timed out"))
            }
            _ => self.emit(GitLogStream::Err, &finished.failure_text("git failed")),
        }
        finished
    }

    async fn run_inner(&self, cmd: GitCommand<'_>) -> Finished {
        let mut args = self.prefix.to_vec();
        args.extend(cmd.args);
        let spawned = self.guard.spawn(SpawnSpec {
            program: "git",
            args,
            project_dir: self.root.as_fd(),
            cwd: Some(cmd.cwd),
            private: self.private,
            extra_env: self.env.to_vec(),
            net: NetPolicy::default(),
        });
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                return Finished {
                    ending: Ending::NotStarted(e.to_string()),
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                    stdout_cut: false,
                };
            }
        };
        let id = child.id();
        let mut cancel_guard = KillOnDrop { id, armed: true };
        let (tx, rx) = async_channel::bounded(LINE_QUEUE);
        let out_buf = Arc::new(Mutex::new(Captured::default()));
        let err_buf = Arc::new(Mutex::new(Captured::default()));
        if let Some(stdout) = child.stdout.take() {
            let (tx, buf, echo) = (tx.clone(), out_buf.clone(), cmd.echo_stdout);
            smol::unblock(move || pump(stdout, GitLogStream::Out, echo, STDOUT_CAP, &buf, &tx))
                .detach();
        }
        if let Some(stderr) = child.stderr.take() {
            let (tx, buf) = (tx.clone(), err_buf.clone());
            smol::unblock(move || pump(stderr, GitLogStream::Err, true, STDERR_CAP, &buf, &tx))
                .detach();
        }
        drop(tx);
        let mut exit_task = smol::unblock(move || child.wait());

        let deadline = Instant::now() + self.timeout;
        let mut phase = Phase::Running;
        let mut exit: Option<std::io::Result<Exit>> = None;
        let mut lines_open = true;
        let mut timed_out = false;
        let mut lines_sent = 0usize;
        let mut truncated_noted = false;
        while lines_open || exit.is_none() {
            let wake = match phase {
                Phase::Running => deadline,
                Phase::Terminating(at) | Phase::Draining(at) => at,
            };
            let waiting_exit = exit.is_none();
            let event = {
                let lines = async {
                    if lines_open {
                        Event::Line(rx.recv().await.ok())
                    } else {
                        future::pending().await
                    }
                };
                let exited = async {
                    if waiting_exit {
                        Event::Exited((&mut exit_task).await)
                    } else {
                        future::pending().await
                    }
                };
                let timer = async {
                    smol::Timer::at(wake).await;
                    Event::Wake
                };
                future::or(lines, future::or(exited, timer)).await
            };
            match event {
                Event::Line(Some((stream, line))) => {
                    if lines_sent < MAX_LOG_LINES {
                        lines_sent += 1;
                        self.emit(stream, &line);
                    } else if !truncated_noted {
                        truncated_noted = true;
                        self.emit(
                            GitLogStream::Meta,
                            &format!("additional git output truncated after {MAX_LOG_LINES} lines"),
                        );
                    }
                }
                Event::Line(None) => lines_open = false,
                Event::Exited(result) => {
                    exit = Some(result);
                    phase = Phase::Draining(Instant::now() + DRAIN_GRACE);
                }
                Event::Wake => match phase {
                    Phase::Running => {
                        timed_out = true;
                        signal(id, Signal::SIGTERM);
                        phase = Phase::Terminating(Instant::now() + TERM_GRACE);
                    }
                    Phase::Terminating(_) => {
                        signal(id, Signal::SIGKILL);
                        exit = Some((&mut exit_task).await);
                        phase = Phase::Draining(Instant::now() + DRAIN_GRACE);
                    }
                    Phase::Draining(_) => break,
                },
            }
        }
        // Whatever is left of the group (a helper that kept the pipe, or one that ignored
        // SIGTERM) goes now. The leader is reaped, so this finds members by group id.
        smol::unblock(move || signal(id, Signal::SIGKILL)).await;
        cancel_guard.armed = false;

        let take = |buf: &Arc<Mutex<Captured>>| {
            std::mem::take(&mut *buf.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
        };
        let (stdout, stderr) = (take(&out_buf), take(&err_buf));
        let ending = if timed_out {
            Ending::TimedOut(self.timeout)
        } else {
            match exit {
                Some(Ok(Exit::Code(c))) => Ending::Exited(c),
                Some(Ok(Exit::Signal(s))) => Ending::Signalled(s),
                Some(Ok(Exit::Unknown)) | None => Ending::Lost("exit status unknown".to_owned()),
                Some(Err(e)) => Ending::Lost(e.to_string()),
            }
        };
        Finished {
            ending,
            stdout: stdout.bytes,
            stderr: stderr.bytes,
            stdout_cut: stdout.cut,
        }
    }
}

/// Signal git's process group; failures are logged, not fatal (the group may be gone).
fn signal(id: ProcessId, sig: Signal) {
    if let Err(e) = id.signal_group(sig) {
        tracing::warn!(pid = id.pid, signal = ?sig, "stopping git's process group: {e}");
    }
}

/// Drain one pipe: keep up to `cap` bytes, and hand complete lines (split on CR or LF) to
/// the async side while it listens. Runs on a blocking thread until EOF.
fn pump(
    mut reader: impl Read,
    stream: GitLogStream,
    echo: bool,
    cap: usize,
    captured: &Mutex<Captured>,
    tx: &async_channel::Sender<(GitLogStream, String)>,
) {
    let mut buf = [0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let mut sending = echo;
    let flush = |line: &mut Vec<u8>, sending: &mut bool| {
        if *sending && !line.is_empty() {
            let text = String::from_utf8_lossy(line).into_owned();
            if tx.send_blocking((stream, text)).is_err() {
                *sending = false;
            }
        }
        line.clear();
    };
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let chunk = &buf[..n];
        {
            let mut kept = captured.lock().unwrap_or_else(|p| p.into_inner());
            let room = cap.saturating_sub(kept.bytes.len());
            kept.bytes.extend_from_slice(&chunk[..n.min(room)]);
            kept.cut |= n > room;
        }
        if sending {
            for &b in chunk {
                if b == b'\n' || b == b'\r' {
                    flush(&mut line, &mut sending);
                } else if line.len() < MAX_RAW_LINE {
                    line.push(b);
                }
            }
        }
    }
    flush(&mut line, &mut sending);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(ending: Ending, stderr: &str) -> Finished {
        Finished {
            ending,
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
            stdout_cut: false,
        }
    }

    #[test]
    fn failure_texts() {
        assert_eq!(
            finished(Ending::Exited(128), "fatal: not a git repository").failure_text("x"),
            "fatal: not a git repository"
        );
        assert_eq!(
            finished(Ending::Exited(1), "").failure_text("x"),
            "Git command failed with exit code 1"
        );
        let t = finished(
            Ending::TimedOut(Duration::from_secs(2)),
            "Cloning into 'x'...",
        )
        .failure_text("x");
        assert!(t.starts_with("git timed out after 2000 ms"), "{t}");
        assert!(t.ends_with("Cloning into 'x'..."), "{t}");
        assert_eq!(
            finished(
                Ending::NotStarted("`git` is not on the process allowlist".into()),
                ""
            )
            .failure_text("x"),
            "`git` is not on the process allowlist"
        );
        assert!(finished(Ending::Exited(0), "").ok());
        assert_eq!(finished(Ending::Exited(0), "").summary(), None);
    }

    #[test]
    fn pump_splits_lines_and_caps_bytes() {
        let (tx, rx) = async_channel::bounded(16);
        let kept = Mutex::new(Captured::default());
        let input: &[u8] = b"one\r\ntwo\rthree\nlast";
        pump(input, GitLogStream::Err, true, 6, &kept, &tx);
        drop(tx);
        let mut lines = Vec::new();
        while let Ok((_, l)) = rx.try_recv() {
            lines.push(l);
        }
        assert_eq!(lines, ["one", "two", "three", "last"]);
        let kept = kept.into_inner().unwrap();
        assert_eq!(kept.bytes, b"one\r\nt");
        assert!(kept.cut);
    }
}
