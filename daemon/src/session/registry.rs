//! What the daemon remembers about sessions across restarts, in sled.
//!
//! - `sessions`: session id → JSON [`SessionRecord`]: where OpenCode runs (port, pid and start
//!   time, so a restarted daemon can re-adopt it without ever signalling a recycled pid), its
//!   password (to keep talking to it), its JIT binding (so expiry still ends it after a
//!   restart, which 0.1.50 forgot), the open output stream, and how it ended.
//! - `jit_revocations`: `ref:<credential ref>` or `session:<id>` → JSON [`Revocation`]. The kill
//!   switch writes (and flushes) these *before* it ends anything, so a revoked credential or
//!   session cannot start again, even after a crash in the middle of the kill.
//! - `session_log`: the device-wide replay log `sl` reads: lifecycle records and OpenCode
//!   events in 0.1.50's snapshot-line format (`{"ts","k":"log","src","m","sid"?}`), the last
//!   [`LOG_KEEP`] lines.
//!
//! The password is stored in the journal because a re-adopted OpenCode can only be reached
//! with it; the journal directory is 0700 and owned by the daemon (see [`Journal::open`]), the
//! same protection the device key has.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::journal::{Journal, JournalError};

const TREE_SESSIONS: &str = "sessions";
const TREE_REVOCATIONS: &str = "jit_revocations";
const TREE_LOG: &str = "session_log";

/// Lines the replay log keeps (8 × the largest `sl` request, as 0.1.50's ring).
pub const LOG_KEEP: usize = 1600;
/// Longest `m` of a replay-log line, in characters (0.1.50: 4000).
pub const LOG_MESSAGE_CHARS: usize = 4000;

/// Where a session is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SessionState {
    /// Spawned, not ready yet (a restart finds it and ends it: nobody got its `sr`).
    Starting,
    Running,
    Ended {
        /// Why: `stopped`, `jit_expired`, `jit_revoked`, `exited`, `gone_while_daemon_down`, …
        reason: String,
        at_ms: u64,
        /// How the process ended, when known (`code 0`, `signal 15`); `None` for a re-adopted
        /// process, which is not the daemon's child.
        #[serde(default)]
        exit: Option<String>,
    },
}

/// A session's JIT credential, as far as the daemon needs it after the start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JitBinding {
    /// `j.r`, or the fingerprint when the control plane gave no ref.
    pub credential_ref: String,
    pub expires_at_ms: u64,
    /// 0.1.50's fingerprint: a different credential for the same folder restarts OpenCode.
    pub fingerprint: String,
}

/// One session, as stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Our id: the control plane's `si.s`.
    pub id: String,
    /// OpenCode's id (`ses_…`), once created.
    pub opencode_id: Option<String>,
    /// Folder relative to the root, normalised (`.` for the root).
    pub folder: String,
    /// The folder's absolute real path (OpenCode's directory; editor URL slug).
    pub directory: String,
    pub port: u16,
    pub pid: i32,
    pub start_time: u64,
    /// `OPENCODE_SERVER_PASSWORD` of this OpenCode.
    pub password: String,
    /// [`crate::guard::process::ProtectionReport::short`] at spawn.
    pub protection: String,
    pub jit: Option<JitBinding>,
    /// The output stream prompts currently write to.
    pub stream: Option<String>,
    pub started_at_ms: u64,
    #[serde(flatten)]
    pub state: SessionState,
}

impl std::fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRecord")
            .field("id", &self.id)
            .field("opencode_id", &self.opencode_id)
            .field("folder", &self.folder)
            .field("port", &self.port)
            .field("pid", &self.pid)
            .field("protection", &self.protection)
            .field("jit", &self.jit)
            .field("stream", &self.stream)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl SessionRecord {
    pub fn is_ended(&self) -> bool {
        matches!(self.state, SessionState::Ended { .. })
    }
}

/// A revoked credential ref or session id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub at_ms: u64,
    /// `jk.m`, if the control plane gave one.
    pub reason: Option<String>,
}

/// What can be revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked<'a> {
    Ref(&'a str),
    Session(&'a str),
}

impl Revoked<'_> {
    fn key(&self) -> String {
        match self {
            Revoked::Ref(r) => format!("ref:{r}"),
            Revoked::Session(s) => format!("session:{s}"),
        }
    }
}

/// The sled side of the session manager; see the module doc.
pub struct Registry {
    sessions: sled::Tree,
    revocations: sled::Tree,
    log: sled::Tree,
    log_state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    next: u64,
    len: usize,
    /// The oldest key (keys are consecutive: appended at `next`, trimmed from here), so
    /// trimming removes by key instead of `pop_min`, which walks the tree from its start
    /// (slower the more was deleted before it).
    first: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn open(journal: &Journal) -> Result<Registry, JournalError> {
        let log = journal.tree(TREE_LOG)?;
        let next = match log.last()? {
            Some((k, _)) => k
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_or(0, |n: u64| n + 1),
            None => 0,
        };
        let len = log.len();
        let first = match log.first()? {
            Some((k, _)) => k
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(next),
            None => next,
        };
        Ok(Registry {
            sessions: journal.tree(TREE_SESSIONS)?,
            revocations: journal.tree(TREE_REVOCATIONS)?,
            log,
            log_state: Mutex::new(LogState { next, len, first }),
        })
    }

    /// Every stored session (unreadable records are skipped and reported).
    pub fn load(&self) -> Vec<SessionRecord> {
        let mut out = Vec::new();
        for (k, v) in self.sessions.iter().flatten() {
            match serde_json::from_slice::<SessionRecord>(&v) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(
                    key = %String::from_utf8_lossy(&k),
                    "ignoring an unreadable session record in the journal: {e}"
                ),
            }
        }
        out
    }

    pub fn get(&self, id: &str) -> Option<SessionRecord> {
        let v = self.sessions.get(id).ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// Store (replace) a record. Not flushed: sled writes it out within its flush interval;
    /// callers that must survive a crash right away call [`Registry::flush`].
    pub fn save(&self, record: &SessionRecord) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(record).unwrap_or_default();
        self.sessions.insert(record.id.as_bytes(), bytes)?;
        Ok(())
    }

    pub fn flush(&self) -> Result<(), JournalError> {
        self.sessions.flush()?;
        Ok(())
    }

    /// Record a revocation and flush it to disk.
    pub fn revoke(&self, what: Revoked<'_>, revocation: &Revocation) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(revocation).unwrap_or_default();
        self.revocations.insert(what.key(), bytes)?;
        self.revocations.flush()?;
        Ok(())
    }

    /// Whether `what` was revoked.
    pub fn is_revoked(&self, what: Revoked<'_>) -> bool {
        self.revocations.contains_key(what.key()).unwrap_or(true)
    }

    /// Append a replay-log line (0.1.50 snapshot format) and keep the last [`LOG_KEEP`].
    pub fn log(&self, now_ms: u64, src: &str, message: &str, session: Option<&str>) {
        // Cut at the LOG_MESSAGE_CHARS-th character (no copy char by char: most lines are
        // shorter, and a line of n bytes has at most n characters).
        let cut = if message.len() <= LOG_MESSAGE_CHARS {
            message.len()
        } else {
            message
                .char_indices()
                .nth(LOG_MESSAGE_CHARS)
                .map_or(message.len(), |(i, _)| i)
        };
        let mut m = String::with_capacity(cut + 3);
        m.push_str(&message[..cut]);
        if cut < message.len() {
            m.push('…');
        }
        let mut line = serde_json::json!({
            "ts": iso8601(now_ms),
            "k": "log",
            "src": src,
            "m": m,
        });
        if let Some(sid) = session {
            line["sid"] = serde_json::Value::from(sid);
        }
        let mut state = self.log_state.lock().unwrap_or_else(|p| p.into_inner());
        let key = state.next.to_be_bytes();
        if self.log.insert(key, line.to_string().into_bytes()).is_err() {
            return;
        }
        state.next += 1;
        state.len += 1;
        if state.len > LOG_KEEP + LOG_KEEP / 8 {
            while state.len > LOG_KEEP && state.first < state.next {
                match self.log.remove(state.first.to_be_bytes()) {
                    Ok(Some(_)) => state.len -= 1,
                    Ok(None) => {}
                    Err(_) => break,
                }
                state.first += 1;
            }
        }
    }

    /// The last `n` replay-log lines, oldest first.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let mut lines: Vec<String> = self
            .log
            .iter()
            .rev()
            .flatten()
            .take(n)
            .filter_map(|(_, v)| String::from_utf8(v.to_vec()).ok())
            .collect();
        lines.reverse();
        lines
    }
}

/// `2026-01-02T03:04:05.678Z` for Unix milliseconds (as JavaScript's `toISOString`).
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_735_690_500_123), "2025-01-01T00:15:00.123Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    fn record(id: &str) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            opencode_id: Some("ses_x".into()),
            folder: ".".into(),
            directory: "/p".into(),
            port: 4100,
            pid: 42,
            start_time: 7,
            password: "pw".into(),
            protection: "none".into(),
            jit: None,
            stream: None,
            started_at_ms: 1,
            state: SessionState::Running,
        }
    }

    #[test]
    fn records_revocations_and_log_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(&dir.path().join("d"), 60).unwrap();
            let r = Registry::open(&j).unwrap();
            r.save(&record("s1")).unwrap();
            let mut ended = record("s2");
            ended.state = SessionState::Ended {
                reason: "stopped".into(),
                at_ms: 5,
                exit: None,
            };
            r.save(&ended).unwrap();
            r.revoke(
                Revoked::Ref("ref-1"),
                &Revocation {
                    at_ms: 1,
                    reason: None,
                },
            )
            .unwrap();
            for i in 0..(LOG_KEEP + LOG_KEEP / 8 + 2) {
                r.log(0, "session", &format!("line {i}"), Some("s1"));
            }
            r.flush().unwrap();
            j.flush().unwrap();
        }
        let j = Journal::open(&dir.path().join("d"), 60).unwrap();
        let r = Registry::open(&j).unwrap();
        let mut all = r.load();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], record("s1"));
        assert!(all[1].is_ended());
        assert!(r.is_revoked(Revoked::Ref("ref-1")));
        assert!(!r.is_revoked(Revoked::Ref("ref-2")));
        assert!(!r.is_revoked(Revoked::Session("ref-1")));
        let tail = r.log_tail(2);
        assert_eq!(tail.len(), 2);
        assert!(tail[1].contains(&format!("line {}", LOG_KEEP + LOG_KEEP / 8 + 1)));
        assert!(tail[1].contains("\"sid\":\"s1\""));
        assert!(r.log.len() <= LOG_KEEP + LOG_KEEP / 8);
        r.log(0, "session", "next", None);
        assert!(r.log_tail(1)[0].contains("next"));
    }

    #[test]
    fn long_log_messages_are_cut_at_a_character_count() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("d"), 60).unwrap();
        let r = Registry::open(&j).unwrap();
        let exact = "é".repeat(LOG_MESSAGE_CHARS);
        let long = format!("{exact}€tail");
        r.log(0, "opencode", &exact, None);
        r.log(0, "opencode", &long, None);
        let lines = r.log_tail(2);
        let m = |line: &str| -> String {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["m"].as_str().unwrap().to_owned()
        };
        assert_eq!(
            m(&lines[0]),
            exact,
            "4000 characters (8000 bytes) are kept whole"
        );
        assert_eq!(m(&lines[1]), format!("{exact}…"));
    }

    #[test]
    fn debug_hides_the_password() {
        let s = format!("{:?}", record("s1"));
        assert!(!s.contains("pw\""), "{s}");
    }
}
