//! Parsers for git's machine-readable output. Pure functions over bytes, so they are tested
//! here without running git.

use codemantle_protocol::limits::{GIT_TEXT, MAX_GIT_LIST};

use super::text::truncate_units;

/// Most bytes of file names one status reply carries in total (a frame must stay well under
/// the 17 MiB CBOR limit; a status this large is not useful to a person anyway).
const MAX_STATUS_NAME_BYTES: usize = 4 << 20;

/// `git status --porcelain=v1 -b -z`, classified.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Status {
    /// The branch: `main`, `HEAD (no branch)`; `None` if git printed no `##` line.
    pub branch: Option<String>,
    pub added: Vec<String>,
    pub modified: Vec<String>,
    pub untracked: Vec<String>,
    pub deleted: Vec<String>,
    /// Unmerged paths (`U` in either column, or `AA`/`DD`).
    pub conflicted: Vec<String>,
    /// Entries left out because a list reached [`MAX_GIT_LIST`] or the byte budget.
    pub omitted: usize,
}

/// Parse `-z` porcelain v1 output.
///
/// Classification, first match wins: unmerged → `conflicted`; `A` → `added`; `R`/`C` →
/// `added` (the new name; a rename's old name goes to `deleted`); `M` or `T` → `modified`;
/// `?` → `untracked`; `D` → `deleted`; `!` (ignored) is dropped. 0.1.50 dropped renames,
/// copies and conflicts entirely, and sent "No commits yet on main" as the branch name; here
/// that is `main`.
pub fn status(out: &[u8]) -> Status {
    let mut st = Status::default();
    let mut budget = MAX_STATUS_NAME_BYTES;
    let mut records = out.split(|&b| b == 0).filter(|r| !r.is_empty());
    while let Some(rec) = records.next() {
        let rec = String::from_utf8_lossy(rec);
        if let Some(head) = rec.strip_prefix("## ") {
            st.branch = Some(branch_of_header(head));
            continue;
        }
        if rec.len() < 4
            || rec.as_bytes()[2] != b' '
            || !rec.is_char_boundary(2)
            || !rec.is_char_boundary(3)
        {
            continue;
        }
        let (xy, name) = rec.split_at(3);
        let xy = &xy[..2];
        let renamed = xy.contains(['R', 'C']);
        // With -z a rename or copy is followed by a record holding the source name.
        let source = if renamed {
            records
                .next()
                .map(|r| String::from_utf8_lossy(r).into_owned())
        } else {
            None
        };
        let unmerged = xy.contains('U') || xy == "AA" || xy == "DD";
        let list = if unmerged {
            &mut st.conflicted
        } else if xy.contains('A') || renamed {
            &mut st.added
        } else if xy.contains(['M', 'T']) {
            &mut st.modified
        } else if xy.contains('?') {
            &mut st.untracked
        } else if xy.contains('D') {
            &mut st.deleted
        } else {
            continue;
        };
        push_bounded(list, name, &mut budget, &mut st.omitted);
        if let (Some(src), true) = (source, xy.starts_with('R') || xy.ends_with('R')) {
            push_bounded(&mut st.deleted, &src, &mut budget, &mut st.omitted);
        }
    }
    st
}

fn push_bounded(list: &mut Vec<String>, name: &str, budget: &mut usize, omitted: &mut usize) {
    if list.len() >= MAX_GIT_LIST || name.len() > *budget {
        *omitted += 1;
        return;
    }
    *budget -= name.len();
    list.push(truncate_units(name, GIT_TEXT.max, "…"));
}

/// `main...origin/main [ahead 1]` → `main`; `No commits yet on main` → `main`;
/// `HEAD (no branch)` stays.
fn branch_of_header(head: &str) -> String {
    let head = head
        .strip_prefix("No commits yet on ")
        .or_else(|| head.strip_prefix("Initial commit on "))
        .unwrap_or(head);
    let head = head.split("...").next().unwrap_or(head);
    let head = if head.starts_with("HEAD (") {
        head
    } else {
        head.split(" [").next().unwrap_or(head)
    };
    truncate_units(head.trim(), GIT_TEXT.max, "…")
}

/// `git branch -a --no-color --no-column`: every branch line with its marker (`* ` current,
/// `+ ` checked out in another worktree) stripped, and the current one. Remote-tracking
/// entries keep git's spelling (`remotes/origin/main`, `remotes/origin/HEAD -> origin/main`),
/// as 0.1.50 sent them.
pub fn branches(out: &[u8]) -> (Vec<String>, Option<String>) {
    let text = String::from_utf8_lossy(out);
    let mut list = Vec::new();
    let mut current = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let is_current = line.starts_with('*');
        let name = line
            .strip_prefix(['*', '+'])
            .unwrap_or(line)
            .trim()
            .to_owned();
        if name.is_empty() {
            continue;
        }
        let name = truncate_units(&name, GIT_TEXT.max, "…");
        if is_current {
            current = Some(name.clone());
        }
        if list.len() < MAX_GIT_LIST {
            list.push(name);
        }
    }
    (list, current)
}

/// The short hash from `git commit`'s first line, `[main (root-commit) 1a2b3c4] message`: the
/// word before a `]` that is 4 or more hex digits.
pub fn commit_hash(out: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(out);
    let line = text.lines().find(|l| l.starts_with('['))?;
    line.match_indices(']').find_map(|(i, _)| {
        let word = line[..i].rsplit(char::is_whitespace).next()?;
        (word.len() >= 4 && word.bytes().all(|b| b.is_ascii_hexdigit())).then(|| word.to_owned())
    })
}

/// What `gf get` reports, from `git config --list --show-scope -z`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Identity {
    pub local_name: Option<String>,
    pub global_name: Option<String>,
    pub local_email: Option<String>,
    pub global_email: Option<String>,
    /// The effective `credential.helper` (the last value wins; an empty value resets).
    pub helper: Option<String>,
}

impl Identity {
    /// `user.name`: local first, then global (0.1.50's order).
    pub fn name(&self) -> Option<&str> {
        self.local_name.as_deref().or(self.global_name.as_deref())
    }

    /// `user.email`: local first, then global.
    pub fn email(&self) -> Option<&str> {
        self.local_email.as_deref().or(self.global_email.as_deref())
    }
}

/// Parse `scope NUL key LF value NUL` records. Values given on git's command line (scope
/// `command`: the daemon's own hardening) are ignored.
pub fn identity(out: &[u8]) -> Identity {
    let mut id = Identity::default();
    let mut fields = out.split(|&b| b == 0);
    while let (Some(scope), Some(entry)) = (fields.next(), fields.next()) {
        let scope = String::from_utf8_lossy(scope);
        let entry = String::from_utf8_lossy(entry);
        let (key, value) = entry.split_once('\n').unwrap_or((&entry, ""));
        let key = key.to_ascii_lowercase();
        let value = value.to_owned();
        let non_empty = (!value.is_empty()).then(|| value.clone());
        match (scope.as_ref(), key.as_str()) {
            ("command", _) => {}
            ("local" | "worktree", "user.name") => id.local_name = non_empty,
            ("global", "user.name") => id.global_name = non_empty,
            ("local" | "worktree", "user.email") => id.local_email = non_empty,
            ("global", "user.email") => id.global_email = non_empty,
            (_, "credential.helper") => id.helper = non_empty,
            _ => {}
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classifies_every_state() {
        let out = b"## main...origin/main [ahead 1]\0A  new.rs\0M  staged.rs\0 M work.rs\0?? untracked.txt\0 D gone.rs\0R  renamed.rs\0old.rs\0UU both.rs\0AA twice.rs\0 T type.rs\0!! ignored\0";
        let st = status(out);
        assert_eq!(st.branch.as_deref(), Some("main"));
        assert_eq!(st.added, ["new.rs", "renamed.rs"]);
        assert_eq!(st.modified, ["staged.rs", "work.rs", "type.rs"]);
        assert_eq!(st.untracked, ["untracked.txt"]);
        assert_eq!(st.deleted, ["gone.rs", "old.rs"]);
        assert_eq!(st.conflicted, ["both.rs", "twice.rs"]);
        assert_eq!(st.omitted, 0);
    }

    #[test]
    fn status_branch_headers() {
        let b = |h: &str| status(format!("## {h}\0").as_bytes()).branch;
        assert_eq!(b("No commits yet on master").as_deref(), Some("master"));
        assert_eq!(b("HEAD (no branch)").as_deref(), Some("HEAD (no branch)"));
        assert_eq!(b("feature/x").as_deref(), Some("feature/x"));
        assert_eq!(b("main [gone]").as_deref(), Some("main"));
        assert_eq!(status(b"").branch, None);
    }

    #[test]
    fn status_names_are_verbatim_with_z() {
        let st = status("?? a b\0?? \"q\"\0?? é\0".as_bytes());
        assert_eq!(st.untracked, ["a b", "\"q\"", "é"]);
    }

    #[test]
    fn branch_list() {
        let out = b"* main\n  feature\n+ other-worktree\n  remotes/origin/HEAD -> origin/main\n  remotes/origin/main\n";
        let (list, current) = branches(out);
        assert_eq!(
            list,
            [
                "main",
                "feature",
                "other-worktree",
                "remotes/origin/HEAD -> origin/main",
                "remotes/origin/main"
            ]
        );
        assert_eq!(current.as_deref(), Some("main"));
        let (_, current) = branches(b"* (HEAD detached at 1a2b3c4)\n  main\n");
        assert_eq!(current.as_deref(), Some("(HEAD detached at 1a2b3c4)"));
        assert_eq!(branches(b""), (Vec::new(), None));
    }

    #[test]
    fn commit_hashes() {
        assert_eq!(
            commit_hash(b"[main (root-commit) 1a2b3c4] first\n 1 file changed").as_deref(),
            Some("1a2b3c4")
        );
        assert_eq!(
            commit_hash(b"[feature/x] 9f8e7d6] odd branch\n").as_deref(),
            Some("9f8e7d6")
        );
        assert_eq!(commit_hash(b"nothing to commit"), None);
        assert_eq!(commit_hash(b"[main zz] x"), None);
    }

    #[test]
    fn identity_scopes() {
        let out = b"command\0core.hookspath\n/dev/null\0global\0user.name\nGlobal Name\0global\0user.email\ng@x.io\0local\0user.name\nLocal Name\0global\0credential.helper\nstore\0local\0credential.helper\n\0local\0credential.helper\ncache\0";
        let id = identity(out);
        assert_eq!(id.name(), Some("Local Name"));
        assert_eq!(id.email(), Some("g@x.io"));
        assert_eq!(id.helper.as_deref(), Some("cache"));
        let id = identity(b"global\0credential.helper\nstore\0local\0credential.helper\n\0");
        assert_eq!(id.helper, None);
        assert_eq!(identity(b""), Identity::default());
    }
}
