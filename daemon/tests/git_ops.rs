//! The git operations against real git in the real sandbox: a `ProcessGuard` that drops to
//! `nobody` (the tests run as root), landlock, temp-dir roots. Covers the everyday flow, clone /
//! push / pull through local bare repositories, identity config, injection attempts (refused
//! before git runs, or neutralised by the hardening prefix when git does run), redaction of
//! credentials, and the timeout that stops git's whole process group.
//!
//! SAFETY RULES (these tests run as root on a shared machine):
//! - every file a test creates, changes or deletes is inside its own temp dir; the markers an
//!   injection would create are temp-dir paths the sandboxed git *could* write (inside the
//!   root), so a missing marker means the injection failed, not that landlock hid it;
//! - no symlinks at all; real system paths are never written, only `/proc` is read;
//! - the network is 127.0.0.1 only: repositories are local bare repositories reached by path,
//!   and the "remote" of the timeout and redaction tests is a loopback listener (or a closed
//!   loopback port).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codemantle_daemon::config::ProcessConfig;
use codemantle_daemon::git::{GitError, GitRunner, UrlPolicy};
use codemantle_daemon::guard::path::RootDir;
use codemantle_daemon::guard::process::{AllowedProgram, ProcessGuard, RunAs};
use codemantle_protocol::message::{
    BranchAction, GitAdd, GitBranch, GitCheckout, GitClone, GitCommit, GitConfig, GitConfigAction,
    GitLog, GitLogStream, GitSync, PathRequest,
};

/// The unprivileged user git runs as when the tests run as root.
const NOBODY: u32 = 65534;

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Every git binary on this host worth testing with (Debian's and a newer local build).
fn git_binaries() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("CM_TEST_GIT") {
        return vec![PathBuf::from(p)];
    }
    let found: Vec<PathBuf> = ["/usr/bin/git", "/usr/local/bin/git"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    assert!(!found.is_empty(), "no git binary found for the tests");
    found
}

fn first_git() -> PathBuf {
    git_binaries().remove(0)
}

/// `lchown -R` to the child's user, never following a symlink (there are none, by rule).
fn chown_tree(path: &Path) {
    if !running_as_root() {
        return;
    }
    std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    let meta = std::fs::symlink_metadata(path).unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path());
        }
    }
}

/// Collects `gq` lines.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<GitLog>>>);

impl Logs {
    fn sink(&self) -> impl Fn(GitLog) + Send + Sync + 'static {
        let logs = self.0.clone();
        move |line| logs.lock().unwrap().push(line)
    }

    fn take(&self) -> Vec<GitLog> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    fn text(lines: &[GitLog]) -> String {
        lines
            .iter()
            .map(|l| format!("[{}] {}", l.stream.as_str(), l.line))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One test's world: `tmp/root` (the root, owned by nobody), `tmp/outside`, `tmp/private`
/// (the guard's private_dir), and a runner over a real guard.
struct World {
    tmp: tempfile::TempDir,
    root_path: PathBuf,
    outside: PathBuf,
    root: RootDir,
    runner: GitRunner,
    git: PathBuf,
    logs: Logs,
}

impl World {
    fn new() -> World {
        World::with(
            &first_git(),
            &[],
            Duration::from_secs(60),
            UrlPolicy::default(),
        )
    }

    fn with(git: &Path, connect_ports: &[u16], timeout: Duration, policy: UrlPolicy) -> World {
        let tmp = tempfile::tempdir().unwrap();
        // nobody must be able to pass through the temp dir.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root_path = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&root_path).unwrap();
        std::fs::create_dir(&outside).unwrap();
        chown_tree(&root_path);
        let mut config = ProcessConfig {
            private_dir: tmp.path().join("private"),
            run_as: running_as_root().then_some(RunAs {
                uid: NOBODY,
                gid: NOBODY,
                name: Some("nobody".to_owned()),
            }),
            connect_ports: connect_ports.to_vec(),
            ..ProcessConfig::default()
        };
        config.allowlist.insert(
            "git".to_owned(),
            AllowedProgram {
                path: git.to_owned(),
                args: Vec::new(),
            },
        );
        let guard = Arc::new(ProcessGuard::new(&config).expect("process guard"));
        let runner = GitRunner::new(guard)
            .with_timeout(timeout)
            .with_url_policy(policy);
        let root = RootDir::open("cwd", &root_path).unwrap();
        World {
            tmp,
            root_path,
            outside,
            root,
            runner,
            git: git.to_owned(),
            logs: Logs::default(),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root_path.join(rel)
    }

    /// Plain git, outside the sandbox, as the test's user: only for fixtures in the temp dir.
    fn setup_git(&self, cwd: &Path, args: &[&str]) {
        let home = self.tmp.path().join("setup-home");
        std::fs::create_dir_all(&home).unwrap();
        let out = Command::new(&self.git)
            .args([
                "-c",
                "safe.directory=*",
                "-c",
                "init.defaultBranch=main",
                "-c",
                "user.name=Setup",
                "-c",
                "user.email=setup@example.com",
            ])
            .args(args)
            .current_dir(cwd)
            .env_clear()
            .env("HOME", &home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "setup git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A file in the root, owned by the child's user.
    fn write(&self, rel: &str, content: &str) {
        let path = self.p(rel);
        std::fs::write(&path, content).unwrap();
        chown_tree(&path);
    }

    fn path_req(&self, id: u32, path: &str) -> PathRequest {
        PathRequest {
            request_id: id,
            root: "cwd".into(),
            path: path.into(),
            idempotency_key: None,
        }
    }

    fn status(&self, path: &str) -> codemantle_protocol::message::GitStatusResult {
        let sink = self.logs.sink();
        smol::block_on(
            self.runner
                .status(&self.root, &self.path_req(1, path), &sink),
        )
        .unwrap()
    }

    fn init(&self, path: &str) -> codemantle_protocol::message::GitResult {
        let sink = self.logs.sink();
        smol::block_on(self.runner.init(&self.root, &self.path_req(2, path), &sink)).unwrap()
    }

    fn clone_repo(&self, url: &str, path: &str) -> codemantle_protocol::message::GitResult {
        let sink = self.logs.sink();
        let req = GitClone {
            request_id: 3,
            root: "cwd".into(),
            path: path.into(),
            url: url.into(),
            branch: None,
            idempotency_key: None,
        };
        smol::block_on(self.runner.clone_repo(&self.root, &req, &sink)).unwrap()
    }

    fn add(
        &self,
        path: &str,
        spec: Option<&str>,
        all: bool,
    ) -> codemantle_protocol::message::GitResult {
        let sink = self.logs.sink();
        let req = GitAdd {
            request_id: 4,
            root: "cwd".into(),
            path: path.into(),
            pathspec: spec.map(str::to_owned),
            all,
            idempotency_key: None,
        };
        smol::block_on(self.runner.add(&self.root, &req, &sink)).unwrap()
    }

    fn commit(
        &self,
        path: &str,
        message: &str,
        amend: bool,
    ) -> codemantle_protocol::message::GitCommitResult {
        let sink = self.logs.sink();
        let req = GitCommit {
            request_id: 5,
            root: "cwd".into(),
            path: path.into(),
            message: message.into(),
            amend,
            idempotency_key: None,
        };
        smol::block_on(self.runner.commit(&self.root, &req, &sink)).unwrap()
    }

    fn sync_req(&self, path: &str, remote: Option<&str>, branch: Option<&str>) -> GitSync {
        GitSync {
            request_id: 6,
            root: "cwd".into(),
            path: path.into(),
            remote: remote.map(str::to_owned),
            branch: branch.map(str::to_owned),
            idempotency_key: None,
        }
    }

    fn push(
        &self,
        path: &str,
        remote: Option<&str>,
        branch: Option<&str>,
    ) -> codemantle_protocol::message::GitResult {
        let sink = self.logs.sink();
        smol::block_on(
            self.runner
                .push(&self.root, &self.sync_req(path, remote, branch), &sink),
        )
        .unwrap()
    }

    fn pull(
        &self,
        path: &str,
        remote: Option<&str>,
        branch: Option<&str>,
    ) -> codemantle_protocol::message::GitResult {
        let sink = self.logs.sink();
        smol::block_on(
            self.runner
                .pull(&self.root, &self.sync_req(path, remote, branch), &sink),
        )
        .unwrap()
    }

    fn branch(
        &self,
        path: &str,
        action: Option<BranchAction>,
        name: Option<&str>,
    ) -> codemantle_protocol::message::GitBranchResult {
        let sink = self.logs.sink();
        let req = GitBranch {
            request_id: 7,
            root: "cwd".into(),
            path: path.into(),
            action,
            name: name.map(str::to_owned),
            idempotency_key: None,
        };
        smol::block_on(self.runner.branch(&self.root, &req, &sink)).unwrap()
    }

    fn checkout(
        &self,
        path: &str,
        branch: &str,
        create: bool,
    ) -> codemantle_protocol::message::GitResult {
        let sink = self.logs.sink();
        let req = GitCheckout {
            request_id: 8,
            root: "cwd".into(),
            path: path.into(),
            branch: branch.into(),
            create,
            idempotency_key: None,
        };
        smol::block_on(self.runner.checkout(&self.root, &req, &sink)).unwrap()
    }

    fn config(
        &self,
        path: &str,
        action: GitConfigAction,
        name: Option<&str>,
        email: Option<&str>,
        global: bool,
    ) -> codemantle_protocol::message::GitConfigResult {
        let sink = self.logs.sink();
        let req = GitConfig {
            request_id: 9,
            root: "cwd".into(),
            path: path.into(),
            action,
            name: name.map(str::to_owned),
            email: email.map(str::to_owned),
            global,
            credential_manager: false,
            idempotency_key: None,
        };
        smol::block_on(self.runner.config(&self.root, &req, &sink)).unwrap()
    }

    /// A bare repository `root/<name>` with one commit on `main` (README), owned by nobody.
    fn bare_repo(&self, name: &str) {
        let bare = self.p(name);
        self.setup_git(&self.root_path, &["init", "--bare", "-q", name]);
        let seed = self.tmp.path().join(format!("seed-{name}"));
        self.setup_git(
            self.tmp.path(),
            &[
                "clone",
                "-q",
                bare.to_str().unwrap(),
                seed.to_str().unwrap(),
            ],
        );
        std::fs::write(seed.join("README"), "seeded\n").unwrap();
        self.setup_git(&seed, &["add", "README"]);
        self.setup_git(&seed, &["commit", "-q", "-m", "seed"]);
        self.setup_git(&seed, &["push", "-q", "origin", "HEAD:main"]);
        chown_tree(&bare);
    }
}

fn set(list: &Option<Vec<String>>) -> Vec<&str> {
    let mut v: Vec<&str> = list
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn init_add_commit_status_branch_checkout() {
    for git in git_binaries() {
        let w = World::with(&git, &[], Duration::from_secs(60), UrlPolicy::default());
        eprintln!("-- with {}", git.display());

        // init creates missing directories itself, as the sandboxed user.
        let r = w.init("proj/app");
        assert!(r.ok, "{r:?}");
        assert!(
            r.message
                .as_deref()
                .unwrap_or("")
                .contains("Initialized empty Git repository")
        );
        assert!(w.p("proj/app/.git").is_dir());
        let logs = w.logs.take();
        assert_eq!(logs[0].stream, GitLogStream::Meta);
        assert_eq!(logs[0].line, "$ git init -- proj/app");
        assert_eq!(logs.last().unwrap().line, "git command completed");
        assert!(logs.iter().all(|l| l.request_id == 2));
        if running_as_root() {
            use std::os::unix::fs::MetadataExt as _;
            assert_eq!(std::fs::metadata(w.p("proj")).unwrap().uid(), NOBODY);
        }

        // Identity, in the repository's own config.
        let c = w.config(
            "proj/app",
            GitConfigAction::Set,
            Some("Ada Lovelace"),
            Some("ada@example.com"),
            false,
        );
        assert!(c.ok, "{c:?}");
        assert_eq!(c.name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(c.email.as_deref(), Some("ada@example.com"));
        assert_eq!(c.auth_ready, Some(false));
        assert_eq!(c.message.as_deref(), Some("git config saved"));
        let c = w.config("proj/app", GitConfigAction::Get, None, None, false);
        assert!(c.ok && c.message.is_none(), "{c:?}");
        assert_eq!(c.name.as_deref(), Some("Ada Lovelace"));

        // Unborn branch: its name, not "No commits yet on …".
        w.write("proj/app/one.txt", "one\n");
        w.write("proj/app/two.txt", "two\n");
        let st = w.status("proj/app");
        assert!(st.ok, "{st:?}");
        assert_eq!(st.branch.as_deref(), Some("master"));
        assert_eq!(set(&st.untracked), ["one.txt", "two.txt"]);
        assert!(set(&st.added).is_empty() && set(&st.modified).is_empty());

        // Status from a subdirectory finds the repository above it (within the root).
        std::fs::create_dir(w.p("proj/app/src")).unwrap();
        chown_tree(&w.p("proj/app/src"));
        w.write("proj/app/src/lib.rs", "// lib\n");
        let st = w.status("proj/app/src");
        assert!(st.ok, "{st:?}");

        let a = w.add("proj/app", Some("one.txt"), false);
        assert!(a.ok, "{a:?}");
        let st = w.status("proj/app");
        assert_eq!(set(&st.added), ["one.txt"]);
        assert_eq!(set(&st.untracked), ["src/", "two.txt"]);

        let a = w.add("proj/app", None, true);
        assert!(a.ok, "{a:?}");
        let cm = w.commit("proj/app", "-first commit, starting with a dash", false);
        assert!(cm.ok, "{cm:?}");
        let hash = cm.hash.clone().expect("short hash");
        assert!(
            hash.len() >= 7 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{hash}"
        );
        let st = w.status("proj/app");
        assert!(
            st.ok && set(&st.added).is_empty() && set(&st.untracked).is_empty(),
            "{st:?}"
        );

        // Modify, delete, amend.
        w.write("proj/app/one.txt", "one, changed\n");
        std::fs::remove_file(w.p("proj/app/two.txt")).unwrap();
        let st = w.status("proj/app");
        assert_eq!(set(&st.modified), ["one.txt"]);
        assert_eq!(set(&st.deleted), ["two.txt"]);
        assert!(w.add("proj/app", None, true).ok);
        let amended = w.commit("proj/app", "first, amended", true);
        assert!(amended.ok, "{amended:?}");
        assert_ne!(amended.hash, cm.hash);
        let nothing = w.commit("proj/app", "nothing to commit", false);
        assert!(!nothing.ok);
        assert!(
            nothing.message.as_deref().unwrap_or("").contains("nothing"),
            "{nothing:?}"
        );

        // Branches.
        let b = w.branch("proj/app", Some(BranchAction::Create), Some("feature/x"));
        assert!(b.ok, "{b:?}");
        let b = w.branch("proj/app", None, None);
        assert!(b.ok, "{b:?}");
        assert_eq!(set(&b.branches), ["feature/x", "master"]);
        assert_eq!(b.current.as_deref(), Some("master"));
        let missing = w.branch("proj/app", Some(BranchAction::Create), None);
        assert!(!missing.ok);
        assert_eq!(
            missing.message.as_deref(),
            Some("Invalid branch action or missing branch name")
        );

        let co = w.checkout("proj/app", "feature/x", false);
        assert!(co.ok, "{co:?}");
        assert_eq!(w.status("proj/app").branch.as_deref(), Some("feature/x"));
        let co = w.checkout("proj/app", "topic", true);
        assert!(co.ok, "{co:?}");
        let b = w.branch("proj/app", Some(BranchAction::List), None);
        assert_eq!(b.current.as_deref(), Some("topic"));
        assert!(w.checkout("proj/app", "master", false).ok);
        let d = w.branch("proj/app", Some(BranchAction::Delete), Some("topic"));
        assert!(d.ok, "{d:?}");
        assert!(
            d.message
                .as_deref()
                .unwrap_or("")
                .contains("Deleted branch topic"),
            "{d:?}"
        );
        let b = w.branch("proj/app", None, None);
        assert_eq!(set(&b.branches), ["feature/x", "master"]);

        // A file named like a branch is still a branch to checkout (revision, then `--`).
        w.write("proj/app/feature", "not a branch\n");
        assert!(w.checkout("proj/app", "feature/x", false).ok);

        // Not a repository: a typed failure with git's words, not an `e`.
        std::fs::create_dir(w.p("plain")).unwrap();
        chown_tree(&w.p("plain"));
        let st = w.status("plain");
        assert!(!st.ok);
        assert!(
            st.error
                .as_deref()
                .unwrap_or("")
                .contains("not a git repository"),
            "{st:?}"
        );
        assert!(st.added.is_none());
    }
}

#[test]
fn long_output_is_cut_in_gq_but_not_in_the_reply() {
    let w = World::new();
    w.bare_repo("remote.git");
    assert!(w.clone_repo("remote.git", "work").ok);
    // 250 more branches, written straight into packed-refs (one file, no 250 processes).
    let head = std::fs::read_to_string(w.p("work/.git/refs/heads/main"))
        .or_else(|_| {
            std::fs::read_to_string(w.p("work/.git/packed-refs")).map(|t| {
                t.lines()
                    .find(|l| l.ends_with(" refs/heads/main"))
                    .unwrap_or_default()
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
        .unwrap();
    let head = head.trim();
    assert_eq!(head.len(), 40, "{head:?}");
    // Keep what clone packed (origin's refs); no "sorted" trait, so order does not matter.
    let mut packed = String::from("# pack-refs with: peeled fully-peeled \n");
    if let Ok(existing) = std::fs::read_to_string(w.p("work/.git/packed-refs")) {
        for line in existing.lines().filter(|l| !l.starts_with('#')) {
            packed.push_str(line);
            packed.push('\n');
        }
    }
    for i in 0..250 {
        packed.push_str(&format!("{head} refs/heads/b{i:03}\n"));
    }
    std::fs::write(w.p("work/.git/packed-refs"), packed).unwrap();
    chown_tree(&w.p("work/.git/packed-refs"));
    w.logs.take();

    let b = w.branch("work", None, None);
    assert!(b.ok, "{b:?}");
    assert_eq!(b.current.as_deref(), Some("main"));
    let list = set(&b.branches);
    assert!(list.len() >= 251, "{}", list.len());
    assert!(list.contains(&"b249") && list.contains(&"remotes/origin/main"));
    let logs = w.logs.take();
    let out_lines = logs
        .iter()
        .filter(|l| l.stream == GitLogStream::Out)
        .count();
    assert_eq!(out_lines, 200);
    assert!(
        logs.iter()
            .any(|l| l.line == "additional git output truncated after 200 lines"),
        "{}",
        Logs::text(&logs)
    );
    assert_eq!(logs.last().unwrap().line, "git command completed");

    // A rename shows as the new name added and the old one deleted.
    w.setup_git(&w.p("work"), &["mv", "README", "README.md"]);
    chown_tree(&w.p("work"));
    let st = w.status("work");
    assert!(st.ok, "{st:?}");
    assert_eq!(set(&st.added), ["README.md"]);
    assert_eq!(set(&st.deleted), ["README"]);
    assert_eq!(st.branch.as_deref(), Some("main"));
}

#[test]
fn status_never_finds_a_repository_above_the_root() {
    let w = World::new();
    // The temp dir itself becomes a repository; the root inside it is not one.
    w.setup_git(w.tmp.path(), &["init", "-q", "."]);
    let st = w.status("");
    assert!(!st.ok, "{st:?}");
    assert!(
        st.error
            .as_deref()
            .unwrap_or("")
            .contains("not a git repository"),
        "{st:?}"
    );
}

fn code<T: std::fmt::Debug>(r: Result<T, GitError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.wire_code().as_str().to_owned(),
    }
}

#[test]
fn path_errors_are_typed_errors() {
    let w = World::new();
    let sink = w.logs.sink();

    for (path, want) in [
        ("../outside", "ROOT"),
        ("/abs", "PATH"),
        ("missing", "PATH"),
        ("a\0b", "PATH"),
    ] {
        let req = w.path_req(1, path);
        assert_eq!(
            code(smol::block_on(w.runner.status(&w.root, &req, &sink))),
            want,
            "{path}"
        );
    }
    let req = w.path_req(1, "../outside/new");
    assert_eq!(
        code(smol::block_on(w.runner.init(&w.root, &req, &sink))),
        "ROOT"
    );
    let req = GitClone {
        request_id: 3,
        root: "cwd".into(),
        path: "../outside/clone".into(),
        url: "https://example.invalid/r.git".into(),
        branch: None,
        idempotency_key: None,
    };
    assert_eq!(
        code(smol::block_on(w.runner.clone_repo(&w.root, &req, &sink))),
        "ROOT"
    );
    assert!(
        w.logs.take().is_empty(),
        "git must not start for a refused path"
    );
    assert_eq!(std::fs::read_dir(&w.outside).unwrap().count(), 0);
}

#[test]
fn clone_push_pull_through_local_bare_repositories() {
    let w = World::new();
    w.bare_repo("remote.git");

    // A path relative to the root.
    let r = w.clone_repo("remote.git", "work");
    assert!(r.ok, "{r:?} {}", Logs::text(&w.logs.take()));
    assert_eq!(
        std::fs::read_to_string(w.p("work/README")).unwrap(),
        "seeded\n"
    );
    let logs = w.logs.take();
    assert!(
        logs[0].line.starts_with("$ git clone --no-local -- ") && logs[0].line.ends_with(" work"),
        "{}",
        Logs::text(&logs)
    );

    // file:// with the absolute path, into an existing empty directory.
    std::fs::create_dir(w.p("work2")).unwrap();
    chown_tree(&w.p("work2"));
    let url = format!("file://{}", w.p("remote.git").display());
    let r = w.clone_repo(&url, "work2");
    assert!(r.ok, "{r:?} {}", Logs::text(&w.logs.take()));
    // A non-empty destination is refused before git starts.
    w.logs.take();
    let r = w.clone_repo("remote.git", "work2");
    assert!(!r.ok);
    assert!(
        r.message.as_deref().unwrap_or("").contains("not empty"),
        "{r:?}"
    );
    assert!(w.logs.take().is_empty());

    // Identity in the private home's .gitconfig ("global"), not the daemon user's.
    let c = w.config(
        "work",
        GitConfigAction::Set,
        Some("Grace Hopper"),
        Some("grace@example.com"),
        true,
    );
    assert!(c.ok, "{c:?}");
    let home_config = w.tmp.path().join("private/git/home/.gitconfig");
    let text = std::fs::read_to_string(&home_config).unwrap();
    assert!(text.contains("Grace Hopper"), "{text}");
    let c = w.config("work2", GitConfigAction::Get, None, None, false);
    assert_eq!(c.name.as_deref(), Some("Grace Hopper"), "{c:?}");
    assert_eq!(c.email.as_deref(), Some("grace@example.com"));
    if let Ok(real) = std::fs::read_to_string("/root/.gitconfig") {
        assert!(!real.contains("Grace Hopper"));
    }

    // Commit in one clone, push, pull in the other.
    w.write("work/new.txt", "from work\n");
    assert!(w.add("work", Some("new.txt"), false).ok);
    assert!(w.commit("work", "add new.txt", false).ok);
    let p = w.push("work", Some("origin"), Some("main"));
    assert!(p.ok, "{p:?}");
    let p = w.pull("work2", Some("origin"), Some("main"));
    assert!(p.ok, "{p:?}");
    assert_eq!(
        std::fs::read_to_string(w.p("work2/new.txt")).unwrap(),
        "from work\n"
    );

    // Push and pull with no arguments use the upstream.
    w.write("work2/more.txt", "more\n");
    assert!(w.add("work2", None, false).ok);
    assert!(w.commit("work2", "more", false).ok);
    assert!(w.push("work2", None, None).ok);
    let p = w.pull("work", None, None);
    assert!(p.ok, "{p:?}");
    assert!(w.p("work/more.txt").is_file());

    // A branch alone goes to origin; an unknown remote is named in the reply.
    assert!(w.push("work", None, Some("main")).ok);
    w.logs.take();
    let p = w.push("work", Some("upstream"), Some("main"));
    assert!(!p.ok);
    assert!(
        p.message
            .as_deref()
            .unwrap_or("")
            .contains("no remote named `upstream` (remotes: origin)"),
        "{p:?}"
    );

    // A clone of a repository outside the root is refused, by path or file:// URL.
    w.setup_git(&w.outside, &["init", "--bare", "-q", "elsewhere.git"]);
    let outside_repo = w.outside.join("elsewhere.git");
    for url in [
        outside_repo.display().to_string(),
        format!("file://{}", outside_repo.display()),
        "../outside/elsewhere.git".to_owned(),
    ] {
        w.logs.take();
        let r = w.clone_repo(&url, "stolen");
        assert!(!r.ok, "{url}: {r:?}");
        assert!(w.logs.take().is_empty(), "{url}: git must not start");
        assert!(!w.p("stolen").exists());
    }
}

#[test]
fn injection_attempts_are_refused_before_git_runs() {
    let w = World::new();
    w.bare_repo("remote.git");
    assert!(w.clone_repo("remote.git", "work").ok);
    w.logs.take();
    // Markers inside the root: the sandboxed git *could* create them, so their absence means
    // the injection did not happen.
    let marker = w.p("pwned");
    let outside_marker = w.outside.join("pwned");
    let m = marker.display().to_string();

    let refused = |what: &str, ok: bool, message: Option<&str>, needle: &str| {
        assert!(!ok, "{what}: accepted");
        let text = message.unwrap_or("");
        assert!(
            text.contains(needle),
            "{what}: reply {text:?} does not say {needle:?}"
        );
        let logs = w.logs.take();
        assert!(logs.is_empty(), "{what}: git ran: {}", Logs::text(&logs));
        assert!(
            !marker.exists() && !outside_marker.exists(),
            "{what}: marker created"
        );
    };

    let upload_pack = format!("--upload-pack=touch {m}");
    let r = w.checkout("work", &upload_pack, false);
    refused(
        "checkout --upload-pack",
        r.ok,
        r.message.as_deref(),
        "starts with '-'",
    );
    let r = w.checkout("work", &upload_pack, true);
    refused(
        "checkout -b --upload-pack",
        r.ok,
        r.message.as_deref(),
        "starts with '-'",
    );
    let r = w.branch("work", Some(BranchAction::Create), Some(&upload_pack));
    refused(
        "branch create",
        r.ok,
        r.message.as_deref(),
        "starts with '-'",
    );
    let r = w.branch("work", Some(BranchAction::Delete), Some("-D"));
    refused(
        "branch delete -D",
        r.ok,
        r.message.as_deref(),
        "starts with '-'",
    );
    let r = w.pull("work", Some(&upload_pack), Some("."));
    refused(
        "pull remote --upload-pack",
        r.ok,
        r.message.as_deref(),
        "starts with '-'",
    );
    let r = w.pull("work", Some("origin"), Some(&upload_pack));
    refused(
        "pull branch --upload-pack",
        r.ok,
        r.message.as_deref(),
        "starts with '-'",
    );
    let r = w.push("work", Some(&format!("--receive-pack=touch {m}")), None);
    refused(
        "push --receive-pack",
        r.ok,
        r.message.as_deref(),
        "starts with '-'",
    );
    let r = w.push(
        "work",
        Some(&format!("-c core.sshCommand=touch {m}")),
        Some("main"),
    );
    refused("push -c", r.ok, r.message.as_deref(), "starts with '-'");
    let r = w.push("work", Some(&format!("ext::sh -c touch% {m}")), None);
    refused(
        "push to an ext:: URL",
        r.ok,
        r.message.as_deref(),
        "configured in the repository",
    );
    let r = w.push("work", Some("origin"), Some("+main"));
    refused("force refspec", r.ok, r.message.as_deref(), "force");
    let r = w.push("work", Some("origin"), Some("main:refs/heads/other"));
    refused(
        "refspec with ':'",
        r.ok,
        r.message.as_deref(),
        "cannot contain ':'",
    );

    let r = w.clone_repo(&format!("ext::sh -c touch% {m}"), "c1");
    refused("clone ext::", r.ok, r.message.as_deref(), "remote-helper");
    let r = w.clone_repo("fd::0", "c1");
    refused("clone fd::", r.ok, r.message.as_deref(), "remote-helper");
    let r = w.clone_repo(&upload_pack, "c1");
    refused(
        "clone --upload-pack",
        r.ok,
        r.message.as_deref(),
        "starts with '-'",
    );
    let r = w.clone_repo("git://127.0.0.1/r.git", "c1");
    refused("clone git://", r.ok, r.message.as_deref(), "git://");
    let r = w.clone_repo("ssh://-oProxyCommand=touch%20x/r", "c1");
    refused("clone ssh", r.ok, r.message.as_deref(), "ssh");
    let r = w.clone_repo("git@127.0.0.1:r.git", "c1");
    refused("clone scp-like", r.ok, r.message.as_deref(), "ssh");
    let r = w.clone_repo("/etc", "c1");
    refused("clone /etc", r.ok, r.message.as_deref(), "inside the root");

    let r = w.add("work", Some(":(top)../x"), false);
    refused(
        "pathspec magic",
        r.ok,
        r.message.as_deref(),
        "pathspec magic",
    );
    let r = w.add("work", Some("../outside"), false);
    refused("pathspec ..", r.ok, r.message.as_deref(), "climbs out");
    let r = w.add("work", Some("/etc/passwd"), false);
    refused("pathspec absolute", r.ok, r.message.as_deref(), "absolute");
    let r = w.add("work", Some("--chmod=+x"), false);
    refused(
        "pathspec option",
        r.ok,
        r.message.as_deref(),
        "starts with '-'",
    );

    let evil_name = format!("x\n[core]\n\tfsmonitor = touch {m}");
    let c = w.config("work", GitConfigAction::Set, Some(&evil_name), None, false);
    refused(
        "name with a newline",
        c.ok,
        c.message.as_deref(),
        "control character",
    );
    let c = w.config("work", GitConfigAction::Set, None, Some("a@b.c\nx"), false);
    refused(
        "email with a newline",
        c.ok,
        c.message.as_deref(),
        "invalid_email_format",
    );
    let c = w.config("work", GitConfigAction::Set, Some("--global"), None, false);
    refused("name option", c.ok, c.message.as_deref(), "starts with '-'");

    // The repository's own config is unchanged.
    let config = std::fs::read_to_string(w.p("work/.git/config")).unwrap();
    assert!(
        !config.contains("fsmonitor") && !config.contains("touch"),
        "{config}"
    );
}

#[test]
fn hostile_repository_config_is_overridden() {
    let w = World::new();
    w.bare_repo("remote.git");
    assert!(w.clone_repo("remote.git", "work").ok);
    assert!(
        w.config(
            "work",
            GitConfigAction::Set,
            Some("T"),
            Some("t@example.com"),
            false
        )
        .ok
    );
    let fsmonitor_marker = w.p("fsmonitor-ran");
    let ext_marker = w.p("ext-ran");
    let pager_marker = w.p("pager-ran");
    // What the agent (or a repository's tooling) could write into .git/config.
    let mut config = std::fs::read_to_string(w.p("work/.git/config")).unwrap();
    config.push_str(&format!(
        "[core]\n\tfsmonitor = touch {}\n\tpager = touch {}\n[remote \"evil\"]\n\turl = ext::sh -c touch% {}\n\tfetch = +refs/heads/*:refs/remotes/evil/*\n",
        fsmonitor_marker.display(),
        pager_marker.display(),
        ext_marker.display(),
    ));
    std::fs::write(w.p("work/.git/config"), &config).unwrap();
    chown_tree(&w.p("work/.git/config"));

    // The vector is real: plain git outside the sandbox runs the fsmonitor command (it only
    // touches a file in this test's temp dir).
    w.setup_git(&w.p("work"), &["status", "--porcelain"]);
    assert!(
        fsmonitor_marker.exists(),
        "plain git should have run core.fsmonitor"
    );
    std::fs::remove_file(&fsmonitor_marker).unwrap();

    let st = w.status("work");
    assert!(st.ok, "{st:?}");
    let b = w.branch("work", None, None);
    assert!(b.ok, "{b:?}");
    w.logs.take();
    let p = w.pull("work", Some("evil"), Some("main"));
    assert!(!p.ok, "{p:?}");
    let text = p.message.unwrap_or_default();
    assert!(text.contains("transport 'ext' not allowed"), "{text}");
    assert!(!fsmonitor_marker.exists(), "core.fsmonitor ran");
    assert!(!ext_marker.exists(), "ext:: remote ran");
    assert!(!pager_marker.exists(), "pager ran");

    // A hook planted in the repository does not run on commit.
    let hook_marker = w.p("hook-ran");
    let hook = w.p("work/.git/hooks/pre-commit");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\ntouch {}\n", hook_marker.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    chown_tree(&hook);
    w.write("work/x.txt", "x\n");
    assert!(w.add("work", None, true).ok);
    let c = w.commit("work", "with a hook present", false);
    assert!(c.ok, "{c:?}");
    assert!(!hook_marker.exists(), "pre-commit hook ran");
}

/// A port on 127.0.0.1 that nothing listens on (bound and released).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn credentials_in_urls_never_reach_lines_or_replies() {
    let port = closed_port();
    let w = World::with(
        &first_git(),
        &[port],
        Duration::from_secs(30),
        UrlPolicy::default(),
    );
    for url in [
        format!("https://user:secret@127.0.0.1:{port}/repo.git"),
        format!("http://secret@127.0.0.1:{port}/repo.git?token=secret2&x=secret3"),
    ] {
        let started = Instant::now();
        let r = w.clone_repo(&url, "cloned");
        assert!(!r.ok, "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
        let logs = w.logs.take();
        let all = format!(
            "{}\n{}",
            Logs::text(&logs),
            r.message.clone().unwrap_or_default()
        );
        eprintln!("{all}");
        assert!(!all.contains("secret"), "credential leaked:\n{all}");
        let command = logs
            .iter()
            .find(|l| l.line.starts_with("$ git clone"))
            .expect("the command line");
        assert!(
            command.line.contains("://***@127.0.0.1"),
            "{}",
            command.line
        );
        assert!(logs.iter().any(|l| l.stream == GitLogStream::Err), "{all}");
        assert!(
            !w.p("cloned").exists(),
            "a failed clone leaves no directory"
        );
    }
}

/// Command lines of every process on the host that mention `needle` (read-only /proc scan).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{}: {cmdline}", name.to_string_lossy()));
            }
        }
    }
    found
}

/// A loopback "server" that accepts connections and never answers; returns its port and the
/// connections it holds.
fn hung_server() -> (u16, Arc<Mutex<Vec<std::net::TcpStream>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            keep.lock().unwrap().push(stream);
        }
    });
    (port, held)
}

/// Wait (up to 3 s) until no process mentions `needle` in its argv.
fn assert_none_left(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still running: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_cancelled_request_leaves_no_git_running() {
    let (port, held) = hung_server();
    let w = World::with(
        &first_git(),
        &[port],
        Duration::from_secs(120),
        UrlPolicy::default(),
    );
    let req = GitClone {
        request_id: 3,
        root: "cwd".into(),
        path: "cancelled".into(),
        url: format!("http://127.0.0.1:{port}/hung.git"),
        branch: None,
        idempotency_key: None,
    };
    let sink = w.logs.sink();
    let outcome = smol::block_on(smol::future::or(
        async { Some(w.runner.clone_repo(&w.root, &req, &sink).await) },
        async {
            smol::Timer::after(Duration::from_millis(1500)).await;
            None
        },
    ));
    assert!(
        outcome.is_none(),
        "the clone should still be hanging: {outcome:?}"
    );
    assert!(!held.lock().unwrap().is_empty(), "git never connected");
    assert_none_left(&format!("127.0.0.1:{port}"));
}

#[test]
fn timeout_stops_a_hung_clone_and_its_whole_group() {
    let (port, held) = hung_server();
    let w = World::with(
        &first_git(),
        &[port],
        Duration::from_secs(2),
        UrlPolicy::default(),
    );
    let url = format!("http://127.0.0.1:{port}/hung.git");
    let started = Instant::now();
    let r = w.clone_repo(&url, "hung");
    let took = started.elapsed();
    assert!(!r.ok, "{r:?}");
    let text = r.message.clone().unwrap_or_default();
    assert!(text.starts_with("git timed out after 2000 ms"), "{text}");
    // 2 s deadline, then at most 2 s of SIGTERM grace and 2 s of draining.
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert!(
        !held.lock().unwrap().is_empty(),
        "git never connected: {text}"
    );
    let logs = w.logs.take();
    eprintln!("took {took:?}\n{}", Logs::text(&logs));
    let last = logs.last().unwrap();
    assert_eq!(last.stream, GitLogStream::Meta);
    assert!(
        last.line.starts_with("git timed out"),
        "{}",
        Logs::text(&logs)
    );
    // git and its http helper are gone (both carry the URL in their argv).
    assert_none_left(&format!("127.0.0.1:{port}"));
    assert!(!w.p("hung").exists(), "the half-made clone was not removed");
}
