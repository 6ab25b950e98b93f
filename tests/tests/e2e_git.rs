//! Git end to end with the real binaries: the HTTP API drives a real daemon, which runs the
//! real `/usr/bin/git` through its process guard as `nobody` (the tests run as root) in the
//! landlock sandbox. The whole everyday flow (init, identity, status, add, commit, branches,
//! checkout, clone, push, pull) against a local bare repository, injection attempts refused
//! before git could act on them, and a daemon without git saying how to enable it.
//!
//! SAFETY RULES (these tests run as root on a shared machine):
//! - every file a test creates, changes or deletes is inside its own temp dirs (the daemon's
//!   temp dir holds the project root, the bare repository, the seed repository and git's
//!   private home); the markers an injection would create are paths inside the project root,
//!   which the sandboxed git *could* write, so a missing marker means the injection failed;
//! - no symlinks; real system paths are only read (`/usr/bin/git`, `/proc`);
//! - the network is 127.0.0.1 only (the control plane); repositories are reached by file path.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use codemantle_tests::harness::{ControlPlane, Daemon};
use serde_json::{Value, json};

/// The unprivileged user git runs as when the daemon runs as root.
const NOBODY: u32 = 65534;
/// The git the daemon is allowed to start (the brief's absolute path).
const GIT: &str = "/usr/bin/git";

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `lchown -R nobody` (never following a symlink; there are none, by rule).
fn chown_tree(path: &Path) {
    if !running_as_root() {
        return;
    }
    std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    if std::fs::symlink_metadata(path).unwrap().is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path());
        }
    }
}

/// The `[process]`/`[git]` sections of a daemon that may run git as `nobody`, after making
/// its temp dir passable and its project root nobody's.
fn git_enabled_config(dir: &Path) -> String {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    chown_tree(&dir.join("project"));
    let run_as = if running_as_root() {
        "run_as = \"nobody\"\n"
    } else {
        ""
    };
    format!(
        "[process]\n{run_as}private_dir = {private:?}\n[process.allowlist]\ngit = {GIT:?}\n\
         [git]\ntimeout_s = 60\n",
        private = dir.join("private").display().to_string(),
    )
}

/// Plain git as the test's user, outside the sandbox: only for fixtures in the temp dir.
fn fixture_git(home: &Path, cwd: &Path, args: &[&str]) -> String {
    std::fs::create_dir_all(home).unwrap();
    let out = Command::new(GIT)
        .args([
            "-c",
            "safe.directory=*",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "user.name=Fixture",
            "-c",
            "user.email=fixture@example.com",
        ])
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fixture git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Setup {
    cp: ControlPlane,
    daemon: Daemon,
    id: String,
}

impl Setup {
    fn new() -> Setup {
        assert!(
            Path::new(GIT).is_file(),
            "{GIT} is needed for the git end-to-end tests"
        );
        let mut cp = ControlPlane::start();
        let dev = cp.add_device("e2e-git");
        let daemon = Daemon::start_with(&cp.ws_url(), &dev, git_enabled_config);
        cp.wait_online(&dev.id);
        let log = daemon.log();
        assert!(
            log.contains("process guard ready") && log.contains("level_offered"),
            "the daemon reports the sandbox it can give:\n{log}"
        );
        Setup {
            cp,
            daemon,
            id: dev.id,
        }
    }

    /// `POST /devices/:id/git/<op>` → (status, reply).
    fn git(&self, op: &str, body: Value) -> (u16, Value) {
        self.cp
            .post(&format!("/devices/{}/git/{op}", self.id), body)
    }

    /// A git call that must succeed (200 and `o:1`).
    #[track_caller]
    fn ok(&self, op: &str, body: Value) -> Value {
        let (status, reply) = self.git(op, body);
        assert!(
            status == 200 && reply["o"] == 1,
            "git/{op}: {status} {reply}\n--- daemon log ---\n{}",
            self.daemon.log()
        );
        reply
    }

    /// A file in the project root, owned by the sandbox's user.
    fn write(&self, rel: &str, content: &str) {
        let path = self.daemon.path(rel);
        std::fs::write(&path, content).unwrap();
        chown_tree(&path);
    }

    fn fixture_home(&self) -> std::path::PathBuf {
        self.daemon.dir.path().join("fixture-home")
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_everyday_git_flow_through_the_api() {
    let s = Setup::new();

    // init, identity
    s.ok("init", json!({"path": "work"}));
    assert!(s.daemon.path("work/.git").is_dir());
    if running_as_root() {
        use std::os::unix::fs::MetadataExt as _;
        let owner = std::fs::metadata(s.daemon.path("work/.git")).unwrap().uid();
        assert_eq!(owner, NOBODY, "git ran as process.run_as, not as root");
    }
    s.ok(
        "config",
        json!({"path": "work", "action": "set", "name": "Ada Lovelace", "email": "ada@example.com"}),
    );
    let gv = s.ok("config", json!({"path": "work", "action": "get"}));
    assert_eq!(
        (gv["n"].clone(), gv["e"].clone()),
        (json!("Ada Lovelace"), json!("ada@example.com"))
    );

    // status, add, commit
    s.write("work/hello.txt", "hello\n");
    let gt = s.ok("status", json!({"path": "work"}));
    assert_eq!(strings(&gt["u"]), ["hello.txt"], "{gt}");
    s.ok("add", json!({"path": "work", "files": "hello.txt"}));
    let gt = s.ok("status", json!({"path": "work"}));
    assert_eq!(strings(&gt["a"]), ["hello.txt"], "{gt}");
    let go = s.ok("commit", json!({"path": "work", "message": "first commit"}));
    assert!(go["h"].as_str().is_some_and(|h| h.len() >= 7), "{go}");

    // branches and checkout
    let gu = s.ok("branch", json!({"path": "work"}));
    let default_branch = gu["c"].as_str().expect("current branch").to_owned();
    s.ok(
        "branch",
        json!({"path": "work", "action": "create", "branch": "feature"}),
    );
    let gu = s.ok("branch", json!({"path": "work", "action": "list"}));
    let branches = strings(&gu["b"]);
    assert!(
        branches.contains(&"feature".to_owned()) && branches.contains(&default_branch),
        "{gu}"
    );
    s.ok("checkout", json!({"path": "work", "branch": "feature"}));
    assert_eq!(s.ok("branch", json!({"path": "work"}))["c"], "feature");
    s.ok(
        "checkout",
        json!({"path": "work", "branch": "topic", "create": true}),
    );
    assert_eq!(s.ok("branch", json!({"path": "work"}))["c"], "topic");
    s.ok(
        "checkout",
        json!({"path": "work", "branch": default_branch}),
    );
    s.ok(
        "branch",
        json!({"path": "work", "action": "delete", "branch": "feature"}),
    );
    let branches = strings(&s.ok("branch", json!({"path": "work"}))["b"]);
    assert!(!branches.contains(&"feature".to_owned()), "{branches:?}");

    // clone, push, pull through a bare repository inside the root (file://).
    let seed = s.daemon.dir.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    let home = s.fixture_home();
    fixture_git(&home, &seed, &["init"]);
    std::fs::write(seed.join("README"), "seed\n").unwrap();
    fixture_git(&home, &seed, &["add", "README"]);
    fixture_git(&home, &seed, &["commit", "-m", "seed"]);
    let bare = s.daemon.path("remote.git");
    fixture_git(
        &home,
        s.daemon.dir.path(),
        &[
            "clone",
            "--bare",
            seed.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    chown_tree(&bare);
    let url = format!("file://{}", bare.display());

    s.ok("clone", json!({"path": "a", "url": url}));
    assert_eq!(
        std::fs::read_to_string(s.daemon.path("a/README")).unwrap(),
        "seed\n"
    );
    s.ok(
        "config",
        json!({"path": "a", "action": "set", "name": "Ada", "email": "ada@example.com"}),
    );
    s.write("a/pushed.txt", "from a\n");
    s.ok("add", json!({"path": "a", "all": true}));
    s.ok("commit", json!({"path": "a", "message": "pushed from a"}));
    s.ok(
        "push",
        json!({"path": "a", "remote": "origin", "branch": "main"}),
    );
    let log = fixture_git(
        &home,
        s.daemon.dir.path(),
        &[
            "--git-dir",
            bare.to_str().unwrap(),
            "log",
            "--format=%s",
            "main",
        ],
    );
    assert!(log.contains("pushed from a"), "{log}");

    s.ok("clone", json!({"path": "b", "url": url, "branch": "main"}));
    assert!(s.daemon.path("b/pushed.txt").is_file());
    s.write("a/second.txt", "again\n");
    s.ok("add", json!({"path": "a", "all": 1}));
    s.ok("commit", json!({"path": "a", "message": "second"}));
    s.ok("push", json!({"path": "a"}));
    s.ok(
        "pull",
        json!({"path": "b", "remote": "origin", "branch": "main"}),
    );
    assert_eq!(
        std::fs::read_to_string(s.daemon.path("b/second.txt")).unwrap(),
        "again\n"
    );
}

#[test]
fn injection_attempts_are_refused_and_never_run() {
    let s = Setup::new();
    s.ok("init", json!({"path": "repo"}));
    let marker = s.daemon.path("pwned");
    let touch = format!("touch {}", marker.display());

    // An option as a branch name: refused by the daemon before git starts.
    let (status, gu) = s.git(
        "branch",
        json!({"path": "repo", "action": "create", "branch": format!("--upload-pack={touch}")}),
    );
    assert_eq!(status, 200, "branch answers 200 like 0.1.x: {gu}");
    assert_eq!(gu["o"], 0, "{gu}");
    let (status, gy) = s.git(
        "checkout",
        json!({"path": "repo", "branch": format!("--upload-pack={touch}")}),
    );
    assert_eq!((status, gy["o"].clone()), (400, json!(0)), "{gy}");

    // An option as a remote (git would run the ssh command it names).
    let (status, gd) = s.git(
        "push",
        json!({"path": "repo", "remote": format!("-c core.sshCommand={touch}")}),
    );
    assert_eq!((status, gd["o"].clone()), (400, json!(0)), "{gd}");
    let (status, gn) = s.git(
        "pull",
        json!({"path": "repo", "remote": format!("--upload-pack={touch}")}),
    );
    assert_eq!((status, gn["o"].clone()), (400, json!(0)), "{gn}");

    // A remote helper that runs a command.
    let (status, gl) = s.git(
        "clone",
        json!({"path": "c", "url": format!("ext::sh -c {}", touch.replace(' ', "% "))}),
    );
    assert_eq!((status, gl["o"].clone()), (400, json!(0)), "{gl}");
    assert!(!s.daemon.path("c").exists());

    // A path out of the root: the path guard's refusal, nothing created outside.
    let outside = s.daemon.root.parent().unwrap().join("outside");
    let (status, body) = s.git("init", json!({"path": "../outside"}));
    assert!((400..500).contains(&status), "{status} {body}");
    assert!(!outside.exists());
    let (status, body) = s.git("status", json!({"path": "../outside"}));
    assert!((400..500).contains(&status), "{status} {body}");

    assert!(!marker.exists(), "an injection ran:\n{}", s.daemon.log());
    // The repository is unharmed and git still works.
    s.ok("status", json!({"path": "repo"}));
}

#[test]
fn a_daemon_without_git_says_how_to_enable_it() {
    let mut cp = ControlPlane::start();
    let dev = cp.add_device("e2e-nogit");
    let daemon = Daemon::start(&cp.ws_url(), &dev);
    cp.wait_online(&dev.id);
    let expected = "git is not enabled on this host: add git to [process.allowlist]";
    let (status, gt) = cp.post(&format!("/devices/{}/git/status", dev.id), json!({}));
    assert_eq!(status, 200, "{gt}");
    assert_eq!(
        (gt["o"].clone(), gt["e"].clone()),
        (json!(0), json!(expected))
    );
    let (status, gj) = cp.post(
        &format!("/devices/{}/git/init", dev.id),
        json!({"path": "x"}),
    );
    assert_eq!(status, 400, "{gj}");
    assert_eq!(gj["m"], expected);
    assert!(!daemon.path("x").exists());
}
