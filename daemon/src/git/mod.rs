//! `git`: the git operations behind `gs gi gk ga gp gh gm gc gx gf` (and the live `gq` lines),
//! run through the process guard.
//!
//! CodeMantle 0.1.50 spawned `git` from `PATH` with the daemon's whole environment and placed
//! wire strings straight into argv with no `--`: a pull with remote `--upload-pack=<cmd>` ran
//! `<cmd>` (its spec, §15.1). This module's job is to make that class of bug impossible and to
//! keep git, and anything a repository can make git run, inside the sandbox.
//!
//! # What git is started with
//!
//! - **Only through [`ProcessGuard::spawn`]**, allowlist name `git` (an absolute path from
//!   `[process.allowlist]`), as the unprivileged `run_as` user, in landlock: read-write only
//!   beneath the **root** the request names and the private `HOME`/`TMPDIR`. The working
//!   directory is `p`, opened through the path guard (an fd, not a string), so a symlink swap
//!   cannot move it. The root rather than `p` is the writable tree because a repository's
//!   `.git` may sit above `p` (`p` = `repo/src`); `GIT_CEILING_DIRECTORIES` (the root's parent)
//!   stops git's upward search at the root.
//! - **A fixed hardening prefix** ([`hardening_args`]): `--no-pager --literal-pathspecs` and
//!   `-c` settings that beat any repository or home config, because `.git/config` is written by
//!   whoever controls the tree (the coding agent, a cloned repository's tooling):
//!   `core.hooksPath=/dev/null` (no hooks), `core.fsmonitor=false`, `core.askPass=` (no
//!   prompt programs), `protocol.allow=never` with `https` always, `http` and `ssh` per
//!   [`UrlPolicy`], `file` only when the user asked directly (`user`: not for submodules), so
//!   `ext::` and other remote helpers never run, whatever a remote URL in the config says;
//!   `safe.bareRepository=explicit` (a bare repository planted in a checkout is not entered);
//!   `gc.autoDetach=false`, `maintenance.autoDetach=false` (no helper outlives the request);
//!   no submodule recursion; no colour. With ssh allowed, `core.sshCommand=ssh -o
//!   BatchMode=yes` replaces any configured ssh command.
//! - **Environment**: the guard builds it from scratch (no `GIT_*` of the daemon's own unless
//!   the operator passes one in `process.env_pass`); this module adds
//!   `GIT_TERMINAL_PROMPT=0`, `GIT_CONFIG_NOSYSTEM=1`, `GIT_MERGE_AUTOEDIT=no`, `LC_ALL=C` (the
//!   parsers read git's English) and `GIT_CEILING_DIRECTORIES`. `HOME` is the private home of
//!   [`GitRunner::with_home_key`], so "global" config is that home's `.gitconfig`, never the
//!   daemon user's.
//!
//! # What user input may be
//!
//! Nothing from the wire is ever placed where git parses options. Paths come after `--`;
//! remotes and branches of `branch`, `push` and `pull` after `--end-of-options` (git ≥ 2.24;
//! `--` would make them paths); option values are single `--opt=value` elements or follow
//! their option (`-b <name>`). The one exception is `checkout <branch> --`, where git before
//! 2.44 mishandles `--end-of-options`; there the name check below is the guard. On top of
//! that, [`args`] refuses anything starting with `-`, control characters (a newline in a
//! name), pathspec magic (`:(top)…`), ref names git would refuse (`git check-ref-format --branch` rules, plus a leading `+`), remotes that are
//! not plain names (push and pull go to a configured remote, never an ad-hoc URL or path), and
//! clone URLs outside [`UrlPolicy`] (`ext::`, `fd::`, `git://`, local paths outside the root).
//! Refusals are typed replies with `o:0` and an `m` that says what was refused and what to
//! send instead; git never starts for them.
//!
//! Errors: `p` goes through the path guard, and its failures are `e PATH`/`e ROOT`/`e
//! INTERNAL` ([`GitError`]); everything after that is the typed reply with `o:0` (or `gt.e`),
//! as in 0.1.50 §5.17.
//!
//! # Output
//!
//! Every command sends `gq` lines to the caller's [`LogSink`] (meta `$ git …`, then up to 200
//! output lines, then completion or failure), all before the operation returns. Lines and
//! reply texts are redacted: URL userinfo (`https://***@host`), URL query values and
//! `NAME=value` secrets ([`text::redact`]). 0.1.50 redacted only the live lines.
//!
//! # Differences from 0.1.50, on purpose
//!
//! - `gp.a` is **amend** (`--amend`), as the control plane documents and sends it; 0.1.50's
//!   daemon ran `commit -a` for it, which its own control plane never meant.
//! - `gs` reports renames (new name added, old deleted), type changes (modified) and conflicts
//!   (`c`, newline-separated), and the branch of an unborn repository as its name.
//! - `gh`/`gm` with a branch but no remote use `origin` (0.1.50 passed the branch as the remote).
//! - `gf cm=1` does not install a credential helper (0.1.50 set the Windows-only
//!   `manager-core` everywhere); the reply says so. `gf get` reports the effective helper.
//! - `gk` into an existing directory requires it to be empty; a local source must be inside
//!   the same root and is cloned with `--no-local` (git's transport, never hard links into a
//!   tree the requester does not own).
//! - Timeouts stop git's whole process group (SIGTERM, then SIGKILL), not only git.
//!
//! # Known limits
//!
//! - A clone URL with credentials (`https://user:token@host/…`) is passed to git as given, so
//!   the token is in git's argv while the clone runs and git stores it in the clone's
//!   `.git/config` (as 0.1.50 did). It is redacted from every line and reply. Keeping it out of
//!   both needs a credential store in the private home; not done yet.
//! - Resolving `p`, creating the private home and the guard's spawn are short blocking system
//!   calls made on the calling task; the waiting and reading happen on smol's blocking pool.
//! - Hooks never run, so a repository's own pre-commit checks do not run on `gp` either.

pub mod args;
mod exec;
pub mod parse;
pub mod text;

use std::ffi::OsString;
use std::os::fd::AsFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::sync::Arc;
use std::time::Duration;

use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::limits;
use codemantle_protocol::message::{
    BranchAction, GitAdd, GitBranch, GitBranchResult, GitCheckout, GitClone, GitCommit,
    GitCommitResult, GitConfig, GitConfigAction, GitConfigResult, GitLogStream, GitResult,
    GitStatusResult, GitSync, PathRequest,
};

use crate::guard::path::{GuardError, RelPath, RootDir};
use crate::guard::process::{PrivateDirs, ProcessGuard};

pub use self::args::{CloneSource, Refused, UrlPolicy};
pub use self::exec::{DRAIN_GRACE, LogSink, MAX_LOG_LINES, TERM_GRACE};

use self::exec::{Exec, Finished, GitCommand};
use self::text::truncate_units;

/// Default deadline of one git command (0.1.50's `GIT_COMMAND_TIMEOUT_MS`). The reference
/// control plane gives git requests 180 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Default private-directory key: the `HOME` whose `.gitconfig` is the "global" git config.
pub const DEFAULT_HOME_KEY: &str = "git";

/// The allowlist name git is started under.
pub const GIT_PROGRAM: &str = "git";

/// Why a git request was answered with an `e` frame instead of its typed reply: `p` failed
/// the path guard.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// `p` is malformed, missing, not a directory, or leads out of the root.
    #[error(transparent)]
    Path(#[from] GuardError),
}

impl GitError {
    /// `PATH`, `ROOT` or `INTERNAL` (see [`GuardError::wire_code`]).
    pub fn wire_code(&self) -> ErrorCode {
        match self {
            GitError::Path(e) => e.wire_code(),
        }
    }
}

/// Runs git operations for the dispatcher. Cheap to share behind an `Arc`; every method is
/// independent and may run concurrently (git's own lock files serialise writers).
///
/// Each operation takes the request, the [`RootDir`] its `r` named (the dispatcher resolves
/// the alias; an unknown one is its `e ROOT`), and the sink for `gq` lines; it returns the
/// typed reply, or [`GitError`] for an `e` frame.
#[derive(Debug)]
pub struct GitRunner {
    guard: Arc<ProcessGuard>,
    timeout: Duration,
    policy: UrlPolicy,
    home_key: String,
}

/// What one request needs for all its git commands.
struct Prepared {
    private: PrivateDirs,
    prefix: Vec<OsString>,
    env: Vec<(String, OsString)>,
}

impl GitRunner {
    /// A runner with the default timeout, URL policy and home key.
    pub fn new(guard: Arc<ProcessGuard>) -> GitRunner {
        GitRunner {
            guard,
            timeout: DEFAULT_TIMEOUT,
            policy: UrlPolicy::default(),
            home_key: DEFAULT_HOME_KEY.to_owned(),
        }
    }

    /// Deadline of each git command (a `gf` runs several, each with this deadline).
    pub fn with_timeout(mut self, timeout: Duration) -> GitRunner {
        self.timeout = timeout;
        self
    }

    /// Which transports clones (and every push and pull) may use.
    pub fn with_url_policy(mut self, policy: UrlPolicy) -> GitRunner {
        self.policy = policy;
        self
    }

    /// The private-directory key ([`ProcessGuard::private_dirs`]) whose `home` is git's
    /// `HOME`. Give sessions the same key if their agent should commit with the identity
    /// `gf g=1` sets.
    pub fn with_home_key(mut self, key: impl Into<String>) -> GitRunner {
        self.home_key = key.into();
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn url_policy(&self) -> &UrlPolicy {
        &self.policy
    }

    /// `gs` → `gt`: `git status --porcelain=v1 -b -z`, classified ([`parse::status`]).
    pub async fn status(
        &self,
        root: &RootDir,
        req: &PathRequest,
        log: &LogSink,
    ) -> Result<GitStatusResult, GitError> {
        let id = req.request_id;
        let failed = |text: String| GitStatusResult {
            request_id: id,
            ok: false,
            branch: None,
            added: None,
            modified: None,
            untracked: None,
            deleted: None,
            conflict: None,
            error: Some(text),
        };
        let dir = open_target(root, &req.path)?;
        let prep = match self.prepare(root) {
            Ok(p) => p,
            Err(text) => return Ok(failed(text)),
        };
        let exec = prep.exec(self, root, id, log);
        let done = exec
            .run(
                GitCommand::new(dir.as_fd(), &["status", "--porcelain=v1", "-b", "-z"])
                    .quiet_stdout(),
            )
            .await;
        if !done.ok() {
            return Ok(failed(done.failure_text("git_status_failed")));
        }
        let mut out: &[u8] = &done.stdout;
        if done.stdout_cut {
            // Only whole records: the last one may be cut mid-name.
            let whole = out.iter().rposition(|&b| b == 0).map_or(0, |i| i + 1);
            out = &out[..whole];
            exec.emit(
                GitLogStream::Meta,
                "status output too large: only its beginning was read, the lists are incomplete",
            );
        }
        let st = parse::status(out);
        if st.omitted > 0 {
            exec.emit(
                GitLogStream::Meta,
                &format!(
                    "status lists cut: {} entries left out (at most {} per list)",
                    st.omitted,
                    limits::MAX_GIT_LIST
                ),
            );
        }
        let conflict = (!st.conflicted.is_empty())
            .then(|| truncate_units(&st.conflicted.join("\n"), limits::GIT_TEXT.max, "…"));
        Ok(GitStatusResult {
            request_id: id,
            ok: true,
            branch: Some(st.branch.unwrap_or_else(|| "unknown".to_owned())),
            added: Some(st.added),
            modified: Some(st.modified),
            untracked: Some(st.untracked),
            deleted: Some(st.deleted),
            conflict,
            error: None,
        })
    }

    /// `gi` → `gj`: `git init`. Missing directories of `p` are created by git (as the
    /// sandboxed user, so they belong to it), beneath the deepest one that exists.
    pub async fn init(
        &self,
        root: &RootDir,
        req: &PathRequest,
        log: &LogSink,
    ) -> Result<GitResult, GitError> {
        let id = req.request_id;
        let rel = RelPath::parse(&req.path)?;
        let comps: Vec<&str> = rel.components().collect();
        let mut existing = comps.len();
        let dir = loop {
            let prefix = RelPath::parse(&comps[..existing].join("/"))?;
            match root.open_dir(&prefix) {
                Ok(fd) => break fd,
                Err(GuardError::NotFound { .. }) if existing > 0 => existing -= 1,
                Err(e) => return Err(e.into()),
            }
        };
        let missing = comps[existing..].join("/");
        let prep = match self.prepare(root) {
            Ok(p) => p,
            Err(text) => return Ok(plain(id, false, Some(text))),
        };
        let mut cmd = GitCommand::new(dir.as_fd(), &["init"]);
        if !missing.is_empty() {
            cmd = cmd.arg("--").arg(missing);
        }
        let done = prep.exec(self, root, id, log).run(cmd).await;
        Ok(outcome(id, &done, "git_init_failed"))
    }

    /// `gk` → `gl`: clone `u` into `p`, which must not exist (its parent must) or be an
    /// empty directory. `u` is checked against the [`UrlPolicy`] first
    /// ([`args::classify_clone_url`]).
    pub async fn clone_repo(
        &self,
        root: &RootDir,
        req: &GitClone,
        log: &LogSink,
    ) -> Result<GitResult, GitError> {
        let id = req.request_id;
        let url = req.url.trim();
        if url.is_empty() {
            return Ok(plain(id, false, Some("Repository URL is required".into())));
        }
        let rel = RelPath::parse(&req.path)?;
        // The destination: an existing empty directory (clone into "."), or a new name in an
        // existing parent (git creates it, as the sandboxed user).
        let (dir, dest) = match root.open_dir(&rel) {
            Ok(fd) => (fd, ".".to_owned()),
            Err(GuardError::NotFound { .. }) => {
                let Some((parent, name)) = rel.split_last() else {
                    return Err(GuardError::NotFound {
                        path: rel.to_string(),
                    }
                    .into());
                };
                (root.open_dir(&parent)?, name.to_owned())
            }
            Err(e) => return Err(e.into()),
        };
        if dest == "." && !dir_is_empty(root, &rel)? {
            return Ok(plain(
                id,
                false,
                Some(format!(
                    "`{rel}` already exists and is not empty — clone into a new directory or an empty one"
                )),
            ));
        }
        let branch = req.branch.as_deref().filter(|b| !b.is_empty());
        if let Some(b) = branch {
            if let Err(r) = args::check_branch("branch", b) {
                return Ok(plain(id, false, Some(r.0)));
            }
        }
        let source = match args::classify_clone_url(url, root, &self.policy) {
            Ok(s) => s,
            Err(r) => return Ok(plain(id, false, Some(r.0))),
        };
        let prep = match self.prepare(root) {
            Ok(p) => p,
            Err(text) => return Ok(plain(id, false, Some(text))),
        };
        let exec = prep.exec(self, root, id, log);
        let mut cmd = GitCommand::new(dir.as_fd(), &["clone"]);
        let source_arg: OsString = match &source {
            CloneSource::Remote { url, insecure } => {
                if *insecure {
                    exec.emit(
                        GitLogStream::Meta,
                        "warning: cloning over plain http:// — the transfer is not encrypted and can be altered on the way",
                    );
                }
                url.into()
            }
            CloneSource::Local { host_path, .. } => {
                cmd = cmd.arg("--no-local");
                host_path.clone().into_os_string()
            }
        };
        if let Some(b) = branch {
            cmd = cmd.arg(format!("--branch={b}"));
        }
        let cmd = cmd.arg("--").arg(source_arg).arg(dest);
        let done = exec.run(cmd).await;
        Ok(outcome(id, &done, "git_clone_failed"))
    }

    /// `ga` → `gb`: `git add -A` (`A`), or `git add -- <f>` (`f`, a plain path relative to
    /// `p`, literal), or `git add -- .`.
    pub async fn add(
        &self,
        root: &RootDir,
        req: &GitAdd,
        log: &LogSink,
    ) -> Result<GitResult, GitError> {
        let id = req.request_id;
        let dir = open_target(root, &req.path)?;
        let cmd = if req.all {
            GitCommand::new(dir.as_fd(), &["add", "-A"])
        } else {
            let spec = match req.pathspec.as_deref().filter(|f| !f.is_empty()) {
                None => ".".to_owned(),
                Some(f) => match args::check_pathspec(f) {
                    Ok(spec) => spec,
                    Err(r) => return Ok(plain(id, false, Some(r.0))),
                },
            };
            GitCommand::new(dir.as_fd(), &["add", "--"]).arg(spec)
        };
        self.run_plain(root, id, log, cmd, "git_add_failed").await
    }

    /// `gp` → `go`: `git commit --message=<m> [--amend]`; `h` is the new commit's short hash.
    pub async fn commit(
        &self,
        root: &RootDir,
        req: &GitCommit,
        log: &LogSink,
    ) -> Result<GitCommitResult, GitError> {
        let id = req.request_id;
        let failed = |text: String| GitCommitResult {
            request_id: id,
            ok: false,
            hash: None,
            message: Some(text),
        };
        let dir = open_target(root, &req.path)?;
        if req.message.contains('\0') {
            return Ok(failed(
                "refused commit message: it contains a NUL byte".to_owned(),
            ));
        }
        let prep = match self.prepare(root) {
            Ok(p) => p,
            Err(text) => return Ok(failed(text)),
        };
        let mut cmd =
            GitCommand::new(dir.as_fd(), &["commit"]).arg(format!("--message={}", req.message));
        if req.amend {
            cmd = cmd.arg("--amend");
        }
        let done = prep.exec(self, root, id, log).run(cmd).await;
        if !done.ok() {
            return Ok(failed(done.failure_text("git_commit_failed")));
        }
        Ok(GitCommitResult {
            request_id: id,
            ok: true,
            hash: parse::commit_hash(&done.stdout),
            message: done.summary(),
        })
    }

    /// `gh` → `gd`: `git push [--end-of-options <remote> [<branch>]]`.
    pub async fn push(
        &self,
        root: &RootDir,
        req: &GitSync,
        log: &LogSink,
    ) -> Result<GitResult, GitError> {
        self.sync(root, req, log, "push", "git_push_failed").await
    }

    /// `gm` → `gn`: `git pull [--end-of-options <remote> [<branch>]]`.
    pub async fn pull(
        &self,
        root: &RootDir,
        req: &GitSync,
        log: &LogSink,
    ) -> Result<GitResult, GitError> {
        self.sync(root, req, log, "pull", "git_pull_failed").await
    }

    async fn sync(
        &self,
        root: &RootDir,
        req: &GitSync,
        log: &LogSink,
        verb: &str,
        fallback: &str,
    ) -> Result<GitResult, GitError> {
        let id = req.request_id;
        let dir = open_target(root, &req.path)?;
        let remote = req.remote.as_deref().filter(|r| !r.is_empty());
        let branch = req.branch.as_deref().filter(|b| !b.is_empty());
        if let Some(r) = remote {
            if let Err(refused) = args::check_remote(r) {
                return Ok(plain(id, false, Some(refused.0)));
            }
        }
        if let Some(b) = branch {
            if let Err(refused) = args::check_branch("branch", b) {
                return Ok(plain(id, false, Some(refused.0)));
            }
        }
        let remote = remote.or(branch.map(|_| "origin"));
        let prep = match self.prepare(root) {
            Ok(p) => p,
            Err(text) => return Ok(plain(id, false, Some(text))),
        };
        let exec = prep.exec(self, root, id, log);
        if let Some(r) = remote {
            // Only a remote the repository has: an unknown name would be taken as a path.
            let listed = exec.run(GitCommand::new(dir.as_fd(), &["remote"])).await;
            if !listed.ok() {
                return Ok(plain(id, false, Some(listed.failure_text(fallback))));
            }
            let names = String::from_utf8_lossy(&listed.stdout).into_owned();
            if !names.lines().any(|n| n == r) {
                let known: Vec<&str> = names.lines().filter(|n| !n.is_empty()).collect();
                let known = if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                };
                return Ok(plain(
                    id,
                    false,
                    Some(format!(
                        "this repository has no remote named `{r}` (remotes: {known}) — add it first or send one of those"
                    )),
                ));
            }
        }
        let mut cmd = GitCommand::new(dir.as_fd(), &[verb]);
        if let Some(r) = remote {
            cmd = cmd.arg("--end-of-options").arg(r);
            if let Some(b) = branch {
                cmd = cmd.arg(b);
            }
        }
        let done = exec.run(cmd).await;
        Ok(outcome(id, &done, fallback))
    }

    /// `gc` → `gu`: list (`git branch -a`), create (`git branch <n>`) or delete
    /// (`git branch -d <n>`, merged branches only).
    pub async fn branch(
        &self,
        root: &RootDir,
        req: &GitBranch,
        log: &LogSink,
    ) -> Result<GitBranchResult, GitError> {
        let id = req.request_id;
        let reply = |ok: bool, message: Option<String>| GitBranchResult {
            request_id: id,
            ok,
            branches: None,
            current: None,
            message,
        };
        let dir = open_target(root, &req.path)?;
        let action = req.action.unwrap_or(BranchAction::List);
        let name = req.name.as_deref().filter(|n| !n.is_empty());
        let cmd = match (action, name) {
            (BranchAction::List, _) => {
                GitCommand::new(dir.as_fd(), &["branch", "-a", "--no-color", "--no-column"])
            }
            (BranchAction::Create | BranchAction::Delete, None) => {
                return Ok(reply(
                    false,
                    Some("Invalid branch action or missing branch name".to_owned()),
                ));
            }
            (BranchAction::Create | BranchAction::Delete, Some(n)) => {
                if let Err(r) = args::check_branch("branch", n) {
                    return Ok(reply(false, Some(r.0)));
                }
                let args: &[&str] = if action == BranchAction::Create {
                    &["branch", "--end-of-options"]
                } else {
                    &["branch", "-d", "--end-of-options"]
                };
                GitCommand::new(dir.as_fd(), args).arg(n)
            }
        };
        let prep = match self.prepare(root) {
            Ok(p) => p,
            Err(text) => return Ok(reply(false, Some(text))),
        };
        let done = prep.exec(self, root, id, log).run(cmd).await;
        if !done.ok() {
            return Ok(reply(false, Some(done.failure_text("git_branch_failed"))));
        }
        if action == BranchAction::List {
            let (branches, current) = parse::branches(&done.stdout);
            return Ok(GitBranchResult {
                request_id: id,
                ok: true,
                branches: Some(branches),
                current,
                message: None,
            });
        }
        Ok(reply(true, done.summary()))
    }

    /// `gx` → `gy`: `git checkout -b <b> --` (`c`) or `git checkout <b> --`.
    pub async fn checkout(
        &self,
        root: &RootDir,
        req: &GitCheckout,
        log: &LogSink,
    ) -> Result<GitResult, GitError> {
        let id = req.request_id;
        let dir = open_target(root, &req.path)?;
        if let Err(r) = args::check_branch("branch", &req.branch) {
            return Ok(plain(id, false, Some(r.0)));
        }
        // `-b <b>`: the name is the option's value. Without `-b` the name is a positional
        // revision; `--end-of-options` would be the stronger guard, but git before 2.44
        // miscounts it in checkout ("only one reference expected"), so the branch check
        // above (no leading '-') is what keeps it from being an option. The trailing `--`
        // makes it a revision, never a path.
        let cmd = if req.create {
            GitCommand::new(dir.as_fd(), &["checkout", "-b"])
        } else {
            GitCommand::new(dir.as_fd(), &["checkout"])
        }
        .arg(&req.branch)
        .arg("--");
        self.run_plain(root, id, log, cmd, "git_checkout_failed")
            .await
    }

    /// `gf` → `gv`: read or set `user.name`/`user.email`, locally (`--local`, the repository
    /// at `p`) or globally (`g`: the private home's `.gitconfig`).
    ///
    /// `get` reads everything with one `git config --list --show-scope -z` and reports name
    /// and e-mail (local first, then global) and the effective `credential.helper` (`h`, and
    /// `a` = whether one is set). `set` checks the values first (no newlines, `<`, `>` or
    /// leading `-`; e-mail shape → `invalid_email_format`), writes them, and answers with a
    /// fresh read. `cm` never installs a helper.
    pub async fn config(
        &self,
        root: &RootDir,
        req: &GitConfig,
        log: &LogSink,
    ) -> Result<GitConfigResult, GitError> {
        let id = req.request_id;
        let failed = |text: String| GitConfigResult {
            request_id: id,
            ok: false,
            name: None,
            email: None,
            helper: None,
            auth_ready: None,
            message: Some(truncate_units(&text, limits::GIT_CONFIG_MESSAGE.max, "...")),
        };
        let dir = open_target(root, &req.path)?;
        let mut note: Option<String> = None;
        let mut writes: Vec<(&str, String)> = Vec::new();
        if req.action == GitConfigAction::Set {
            let name = req.name.as_deref().unwrap_or("").trim();
            let email = req.email.as_deref().unwrap_or("").trim();
            if name.is_empty() && email.is_empty() && !req.credential_manager {
                return Ok(failed("no_git_config_values_provided".to_owned()));
            }
            if !name.is_empty() {
                if let Err(r) = args::check_identity_name(name) {
                    return Ok(failed(r.0));
                }
                writes.push(("user.name", name.to_owned()));
            }
            if !email.is_empty() {
                if let Err(r) = args::check_identity_email(email) {
                    return Ok(failed(r.0));
                }
                writes.push(("user.email", email.to_owned()));
            }
            if req.credential_manager {
                note = Some(
                    "credential helper not changed: the daemon does not install credential helpers — configure one in the git home's .gitconfig, or use a token URL"
                        .to_owned(),
                );
                if writes.is_empty() {
                    return Ok(failed(note.unwrap_or_default()));
                }
            }
        }
        let prep = match self.prepare(root) {
            Ok(p) => p,
            Err(text) => return Ok(failed(text)),
        };
        let exec = prep.exec(self, root, id, log);
        let scope = if req.global { "--global" } else { "--local" };
        for (key, value) in &writes {
            let cmd = GitCommand::new(dir.as_fd(), &["config", scope, "--", key]).arg(value);
            let done = exec.run(cmd).await;
            if !done.ok() {
                return Ok(failed(done.failure_text("git_config_failed")));
            }
        }
        let read = exec
            .run(
                GitCommand::new(dir.as_fd(), &["config", "--list", "--show-scope", "-z"])
                    .quiet_stdout(),
            )
            .await;
        if !read.ok() {
            return Ok(failed(read.failure_text("git_config_failed")));
        }
        let ident = parse::identity(&read.stdout);
        let message = match req.action {
            GitConfigAction::Get => None,
            GitConfigAction::Set => Some(match note {
                Some(n) => format!("git config saved; {n}"),
                None => "git config saved".to_owned(),
            }),
        };
        let cut = |s: Option<&str>, max: usize| s.map(|s| truncate_units(s, max, "…"));
        Ok(GitConfigResult {
            request_id: id,
            ok: true,
            name: cut(ident.name(), limits::GIT_IDENTITY.max),
            email: cut(ident.email(), limits::GIT_IDENTITY.max),
            helper: cut(ident.helper.as_deref(), limits::GIT_HELPER.max),
            auth_ready: Some(ident.helper.is_some()),
            message: message.map(|m| truncate_units(&m, limits::GIT_CONFIG_MESSAGE.max, "...")),
        })
    }

    async fn run_plain(
        &self,
        root: &RootDir,
        id: u32,
        log: &LogSink,
        cmd: GitCommand<'_>,
        fallback: &str,
    ) -> Result<GitResult, GitError> {
        let prep = match self.prepare(root) {
            Ok(p) => p,
            Err(text) => return Ok(plain(id, false, Some(text))),
        };
        let done = prep.exec(self, root, id, log).run(cmd).await;
        Ok(outcome(id, &done, fallback))
    }

    /// The private home, the hardening prefix and the environment for a request on `root`.
    /// A failure (the private directory cannot be made) is the operator-facing text.
    fn prepare(&self, root: &RootDir) -> Result<Prepared, String> {
        let private = self
            .guard
            .private_dirs(&self.home_key)
            .map_err(|e| format!("cannot prepare git's private home: {e}"))?;
        Ok(Prepared {
            private,
            prefix: hardening_args(&self.policy),
            env: git_env(root),
        })
    }
}

impl Prepared {
    fn exec<'a>(
        &'a self,
        runner: &'a GitRunner,
        root: &'a RootDir,
        request_id: u32,
        log: &'a LogSink,
    ) -> Exec<'a> {
        Exec {
            guard: &runner.guard,
            root,
            private: &self.private,
            prefix: &self.prefix,
            env: &self.env,
            timeout: runner.timeout,
            request_id,
            log,
        }
    }
}

/// The global options before every subcommand; see the module doc for why each is there.
pub fn hardening_args(policy: &UrlPolicy) -> Vec<OsString> {
    let allow = |on: bool| if on { "always" } else { "never" };
    let mut config = vec![
        "core.hooksPath=/dev/null".to_owned(),
        "core.fsmonitor=false".to_owned(),
        "core.askPass=".to_owned(),
        "protocol.allow=never".to_owned(),
        "protocol.https.allow=always".to_owned(),
        format!("protocol.http.allow={}", allow(policy.allow_http)),
        format!("protocol.ssh.allow={}", allow(policy.allow_ssh)),
        "protocol.file.allow=user".to_owned(),
        "protocol.ext.allow=never".to_owned(),
        "safe.bareRepository=explicit".to_owned(),
        "gc.autoDetach=false".to_owned(),
        "maintenance.autoDetach=false".to_owned(),
        "submodule.recurse=false".to_owned(),
        "fetch.recurseSubmodules=false".to_owned(),
        "color.ui=false".to_owned(),
    ];
    if policy.allow_ssh {
        config.push("core.sshCommand=ssh -o BatchMode=yes".to_owned());
    }
    let mut args: Vec<OsString> = vec!["--no-pager".into(), "--literal-pathspecs".into()];
    for c in config {
        args.push("-c".into());
        args.push(c.into());
    }
    args
}

/// The variables added to the guard's scratch environment.
fn git_env(root: &RootDir) -> Vec<(String, OsString)> {
    let mut env: Vec<(String, OsString)> = vec![
        ("GIT_TERMINAL_PROMPT".into(), "0".into()),
        ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
        ("GIT_MERGE_AUTOEDIT".into(), "no".into()),
        ("LC_ALL".into(), "C".into()),
    ];
    // Git never looks for a repository above the root. The list is colon-separated, so a
    // parent whose path has a colon cannot be named (landlock still denies reading there).
    if let Some(parent) = root.path().parent() {
        let bytes = parent.as_os_str().as_bytes();
        if !bytes.is_empty() && !bytes.contains(&b':') {
            env.push((
                "GIT_CEILING_DIRECTORIES".into(),
                parent.as_os_str().to_owned(),
            ));
        }
    }
    env
}

/// `p` through the path guard: an existing directory beneath the root.
fn open_target(root: &RootDir, path: &str) -> Result<std::os::fd::OwnedFd, GitError> {
    let rel = RelPath::parse(path)?;
    Ok(root.open_dir(&rel)?)
}

fn dir_is_empty(root: &RootDir, rel: &RelPath) -> Result<bool, GitError> {
    let fd = root.open_dir(rel)?;
    for entry in crate::guard::dirents::DirReader::new(fd) {
        let entry = entry.map_err(|e| GuardError::from_errno("readdir", &rel.to_string(), e))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}

fn plain(request_id: u32, ok: bool, message: Option<String>) -> GitResult {
    GitResult {
        request_id,
        ok,
        message,
    }
}

fn outcome(id: u32, done: &Finished, fallback: &str) -> GitResult {
    if done.ok() {
        plain(id, true, done.summary())
    } else {
        plain(id, false, Some(done.failure_text(fallback)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_prefix_follows_policy() {
        let strict = hardening_args(&UrlPolicy {
            allow_http: false,
            allow_ssh: false,
        });
        let s: Vec<String> = strict
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&s[..2], ["--no-pager", "--literal-pathspecs"]);
        for must in [
            "core.hooksPath=/dev/null",
            "core.fsmonitor=false",
            "protocol.allow=never",
            "protocol.ext.allow=never",
            "protocol.http.allow=never",
            "protocol.ssh.allow=never",
            "protocol.file.allow=user",
            "safe.bareRepository=explicit",
        ] {
            let at = s
                .iter()
                .position(|a| a == must)
                .unwrap_or_else(|| panic!("{must}"));
            assert_eq!(s[at - 1], "-c", "{must}");
        }
        assert!(!s.iter().any(|a| a.starts_with("core.sshCommand")));
        let ssh = hardening_args(&UrlPolicy {
            allow_http: true,
            allow_ssh: true,
        });
        let s: Vec<String> = ssh
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(s.contains(&"protocol.ssh.allow=always".to_owned()));
        assert!(s.contains(&"protocol.http.allow=always".to_owned()));
        assert!(s.contains(&"core.sshCommand=ssh -o BatchMode=yes".to_owned()));
    }
}
