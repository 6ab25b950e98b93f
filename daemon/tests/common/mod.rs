//! Shared fixtures for the daemon's filesystem tests: a root and an "outside" directory side by
//! side in a temp dir, and the two resolvers to run every test with.
//!
//! SAFETY RULE for every test here: symlinks planted by a test point only into the fixture's
//! own temp dir (`outside`, and `outside/etc` standing in for `/etc`), never at a real system
//! path. These tests run destructive operations (recursive remove, rename, mkdir) through the
//! guard, often as root in CI; if a regression breaks the guard, the worst it may destroy is
//! the temp dir. (A mutation run of an earlier draft with a real `/etc` link emptied the
//! host's /etc. Do not reintroduce such links.)

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use codemantle_daemon::guard::path::{GuardError, Resolver, RootDir};

/// Both resolution strategies; every test runs with each.
pub const RESOLVERS: [Resolver; 2] = [Resolver::Openat2, Resolver::Walk];

/// The secret file placed outside the root.
pub const OUTSIDE_SECRET: &str = "outside-secret";

pub struct Fixture {
    pub _tmp: tempfile::TempDir,
    pub root_path: PathBuf,
    pub outside: PathBuf,
    pub root: RootDir,
}

impl Fixture {
    pub fn new(resolver: Resolver) -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root_path = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&root_path).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join(OUTSIDE_SECRET), b"do not touch").unwrap();
        std::fs::create_dir(outside.join("subdir")).unwrap();
        std::fs::create_dir(outside.join("etc")).unwrap();
        std::fs::write(outside.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        let root = RootDir::open_with("cwd", &root_path, resolver).expect("open root");
        assert_eq!(
            root.resolver(),
            resolver,
            "kernel must support openat2 for this test"
        );
        Fixture {
            _tmp: tmp,
            root_path,
            outside,
            root,
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.root_path.join(rel)
    }

    /// The stand-in for `/etc` (inside the temp dir; see the safety rule above).
    pub fn fake_etc(&self) -> PathBuf {
        self.outside.join("etc")
    }

    /// Sorted names in the outside directory.
    pub fn outside_names(&self) -> Vec<String> {
        names_in(&self.outside)
    }

    /// The outside directory is exactly as created.
    pub fn assert_outside_untouched(&self) {
        assert_eq!(self.outside_names(), ["etc", OUTSIDE_SECRET, "subdir"]);
        assert_eq!(names_in(&self.outside.join("etc")), ["passwd"]);
        assert_eq!(
            std::fs::read(self.outside.join(OUTSIDE_SECRET)).unwrap(),
            b"do not touch"
        );
        assert!(names_in(&self.outside.join("subdir")).is_empty());
    }
}

pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The wire code of an error result, for compact assertions.
pub fn code<T: std::fmt::Debug>(r: Result<T, GuardError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.wire_code().as_str().to_owned(),
    }
}
