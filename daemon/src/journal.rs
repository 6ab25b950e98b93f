//! `journal`: the daemon's offline state, in sled under `data_dir`.
//!
//! Why it exists: the tunnel drops and comes back, and the daemon restarts. A control plane
//! that did not see a reply re-sends the request; a mutating request (mkdir, rename, session
//! start, config apply) must not run twice. The dispatcher therefore records each mutating
//! request's outcome under a request key *before* replying, and answers a re-send from the
//! record ([`Journal::lookup`]) instead of running it again.
//!
//! Layout (one sled tree each; more join later without migrating these):
//!
//! - `meta`: `schema` → `1`.
//! - `outcomes`: request key → `recorded_at_s` (8 bytes, big-endian) ‖ outcome bytes.
//! - `outcomes_by_time`: `recorded_at_s` (BE) ‖ request key → empty; lets [`Journal::prune`]
//!   walk only what expired instead of every record.
//! - later: `sessions`, `chunks` (unacknowledged output), `revocations`.
//!
//! Durability: [`Journal::record_outcome`] flushes (fsync) before returning, so "recorded"
//! means "survives a crash"; control commands are rare enough that the cost does not matter.
//!
//! Time is passed in (`now_s`, seconds since the epoch); the journal has no clock. A record
//! expires when `now_s >= recorded_at_s + retention_s`; a clock that steps backwards only makes
//! records live longer.
//!
//! sled takes an exclusive lock on its directory, so a second daemon on the same `data_dir`
//! fails to open the journal: that doubles as the single-instance check.

use std::path::{Path, PathBuf};

use sled::Transactional as _;
use sled::transaction::{ConflictableTransactionError, TransactionError};

/// Longest request key accepted, in bytes.
pub const MAX_REQUEST_KEY_BYTES: usize = 512;

const SCHEMA: &[u8] = b"1";
const TREE_META: &str = "meta";
const TREE_OUTCOMES: &str = "outcomes";
const TREE_OUTCOMES_BY_TIME: &str = "outcomes_by_time";

/// Why the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "cannot open the journal in {path}: {source} — if another codemantle-daemon uses this data_dir, stop it or give this one its own data_dir"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error("data_dir {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error(
        "journal in {path} has schema {found}, this daemon understands {SCHEMA:?} — use a matching daemon version or move the data_dir aside"
    )]
    Schema { path: PathBuf, found: String },
    #[error("request key is {len} bytes — the limit is {MAX_REQUEST_KEY_BYTES}")]
    KeyTooLong { len: usize },
    #[error("journal storage error: {0}")]
    Storage(#[from] sled::Error),
}

impl From<TransactionError<()>> for JournalError {
    fn from(e: TransactionError<()>) -> Self {
        match e {
            TransactionError::Storage(e) => JournalError::Storage(e),
            // Our transactions never abort.
            TransactionError::Abort(()) => JournalError::Storage(sled::Error::ReportableBug(
                "journal transaction aborted".to_owned(),
            )),
        }
    }
}

/// The open journal. Cheap to share by reference across threads (sled is thread-safe).
pub struct Journal {
    path: PathBuf,
    db: sled::Db,
    outcomes: sled::Tree,
    by_time: sled::Tree,
    retention_s: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("retention_s", &self.retention_s)
            .finish()
    }
}

impl Journal {
    /// Open (or create) the journal in `data_dir/journal`. `data_dir` is created with mode 0700
    /// if missing, and refused if it is world-writable or owned by another user.
    pub fn open(data_dir: &Path, retention_s: u64) -> Result<Journal, JournalError> {
        let dir_err = |reason: String| JournalError::DataDir {
            path: data_dir.to_owned(),
            reason,
        };
        if !data_dir.exists() {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .map_err(|e| dir_err(format!("cannot create it: {e}")))?;
        }
        crate::config::check_private_dir(data_dir).map_err(dir_err)?;

        let path = data_dir.join("journal");
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|source| JournalError::Open {
                path: path.clone(),
                source,
            })?;
        let meta = db.open_tree(TREE_META)?;
        match meta.get("schema")? {
            None => {
                meta.insert("schema", SCHEMA)?;
            }
            Some(v) if v.as_ref() == SCHEMA => {}
            Some(v) => {
                return Err(JournalError::Schema {
                    path,
                    found: String::from_utf8_lossy(&v).into_owned(),
                });
            }
        }
        let outcomes = db.open_tree(TREE_OUTCOMES)?;
        let by_time = db.open_tree(TREE_OUTCOMES_BY_TIME)?;
        Ok(Journal {
            path,
            db,
            outcomes,
            by_time,
            retention_s,
        })
    }

    /// How long outcomes are kept, in seconds.
    pub fn retention_s(&self) -> u64 {
        self.retention_s
    }

    /// Record the outcome of the request `request_key` (e.g. `"<session>:<id>:<t>"`) at
    /// `now_s`, replacing any earlier record under that key. Durable when it returns.
    pub fn record_outcome(
        &self,
        request_key: &str,
        outcome: &[u8],
        now_s: u64,
    ) -> Result<(), JournalError> {
        let key = request_key.as_bytes();
        if key.len() > MAX_REQUEST_KEY_BYTES {
            return Err(JournalError::KeyTooLong { len: key.len() });
        }
        let mut value = Vec::with_capacity(8 + outcome.len());
        value.extend_from_slice(&now_s.to_be_bytes());
        value.extend_from_slice(outcome);
        let index_key = time_key(now_s, key);
        (&self.outcomes, &self.by_time).transaction(|(outcomes, by_time)| {
            if let Some(old) = outcomes.insert(key, value.as_slice())? {
                if let Some(old_at) = recorded_at(&old) {
                    by_time.remove(time_key(old_at, key))?;
                }
            }
            by_time.insert(index_key.as_slice(), &[] as &[u8])?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        Ok(())
    }

    /// The recorded outcome for `request_key`, unless there is none or it expired by `now_s`.
    pub fn lookup(&self, request_key: &str, now_s: u64) -> Result<Option<Vec<u8>>, JournalError> {
        let Some(value) = self.outcomes.get(request_key.as_bytes())? else {
            return Ok(None);
        };
        match recorded_at(&value) {
            Some(at) if !self.expired(at, now_s) => Ok(Some(value[8..].to_vec())),
            _ => Ok(None),
        }
    }

    /// Delete every record expired at `now_s`; returns how many were deleted.
    pub fn prune(&self, now_s: u64) -> Result<usize, JournalError> {
        let Some(cutoff) = now_s.checked_sub(self.retention_s) else {
            return Ok(0);
        };
        // Expired: recorded_at <= now - retention, i.e. index keys below (cutoff + 1) ‖ "".
        let end = cutoff.saturating_add(1).to_be_bytes();
        let mut removed = 0;
        for item in self.by_time.range(..end.as_slice()) {
            let (index_key, _) = item?;
            let Some((at, key)) = split_time_key(&index_key) else {
                // Not ours (cannot happen); drop it so it does not stick.
                self.by_time.remove(&index_key)?;
                continue;
            };
            (&self.outcomes, &self.by_time).transaction(|(outcomes, by_time)| {
                // Only if the record is still the one this index entry describes (a newer
                // record_outcome under the same key moved it).
                if let Some(v) = outcomes.get(key)? {
                    if recorded_at(&v) == Some(at) {
                        outcomes.remove(key)?;
                    }
                }
                by_time.remove(index_key.as_ref())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })?;
            removed += 1;
        }
        if removed > 0 {
            self.db.flush()?;
        }
        Ok(removed)
    }

    /// Number of outcome records held (expired or not).
    pub fn outcome_count(&self) -> usize {
        self.outcomes.len()
    }

    /// Flush everything to disk.
    pub fn flush(&self) -> Result<(), JournalError> {
        self.db.flush()?;
        Ok(())
    }

    /// Open another named tree (for the sessions/chunks/revocations stores to come).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, JournalError> {
        Ok(self.db.open_tree(name)?)
    }

    fn expired(&self, recorded_at: u64, now_s: u64) -> bool {
        now_s >= recorded_at.saturating_add(self.retention_s)
    }
}

fn recorded_at(value: &[u8]) -> Option<u64> {
    let head: [u8; 8] = value.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(head))
}

fn time_key(at: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&at.to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn split_time_key(k: &[u8]) -> Option<(u64, &[u8])> {
    Some((recorded_at(k)?, k.get(8..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("data"), 100).unwrap();
        j.record_outcome("s:1:md", b"ok", 1000).unwrap();
        assert_eq!(
            j.lookup("s:1:md", 1099).unwrap().as_deref(),
            Some(&b"ok"[..])
        );
        assert_eq!(j.lookup("s:1:md", 1100).unwrap(), None);
        // A clock that steps back does not expire anything.
        assert!(j.lookup("s:1:md", 5).unwrap().is_some());
        assert_eq!(j.prune(1099).unwrap(), 0);
        assert_eq!(j.prune(1100).unwrap(), 1);
        assert_eq!(j.outcome_count(), 0);
    }

    #[test]
    fn re_record_moves_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("data"), 100).unwrap();
        j.record_outcome("k", b"one", 1000).unwrap();
        j.record_outcome("k", b"two", 1050).unwrap();
        assert_eq!(j.prune(1120).unwrap(), 0);
        assert_eq!(j.lookup("k", 1120).unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(j.prune(1150).unwrap(), 1);
        assert_eq!(j.lookup("k", 0).unwrap(), None);
    }

    #[test]
    fn key_limit() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("data"), 100).unwrap();
        let long = "k".repeat(MAX_REQUEST_KEY_BYTES + 1);
        assert!(matches!(
            j.record_outcome(&long, b"x", 1),
            Err(JournalError::KeyTooLong { .. })
        ));
    }
}
