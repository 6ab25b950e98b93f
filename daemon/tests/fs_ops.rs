//! Directory operations on the real filesystem, with both resolvers.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::time::{Duration, SystemTime};

use codemantle_daemon::fs::{
    EntryKind, MAX_LIST_LIMIT, MakeDir, list_dir, make_dir, remove_dir, rename,
};
use common::{Fixture, RESOLVERS, code, names_in};

#[test]
fn paging_300_entries_by_128() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::create_dir(f.p("big")).unwrap();
        let mut expected = BTreeSet::new();
        for i in 0..300 {
            // Mixed kinds, names that sort differently as numbers and as bytes.
            let name = format!("e{}", i * 7919 % 1000);
            if i % 3 == 0 {
                std::fs::create_dir(f.p(&format!("big/{name}"))).unwrap();
            } else {
                std::fs::write(f.p(&format!("big/{name}")), b"x").unwrap();
            }
            expected.insert(name);
        }
        assert_eq!(expected.len(), 300);

        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = list_dir(&f.root, "big", 128, cursor.as_deref()).unwrap();
            pages.push(
                page.entries
                    .iter()
                    .map(|e| e.name.clone())
                    .collect::<Vec<_>>(),
            );
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
            assert!(pages.len() <= 3, "{r:?}: too many pages");
        }
        let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 128, 44], "{r:?}");
        let all: Vec<String> = pages.concat();
        let sorted: Vec<String> = expected.iter().cloned().collect();
        assert_eq!(
            all, sorted,
            "{r:?}: pages must be the sorted set, no duplicates or gaps"
        );

        // Stable: the same cursor gives the same page.
        let first = list_dir(&f.root, "big", 128, None).unwrap();
        let again = list_dir(&f.root, "big", 128, None).unwrap();
        assert_eq!(first, again);
        let second = list_dir(&f.root, "big", 128, first.next_cursor.as_deref()).unwrap();
        assert_eq!(
            second
                .entries
                .iter()
                .map(|e| e.name.clone())
                .collect::<Vec<_>>(),
            pages[1]
        );

        // Limits are clamped.
        let l = list_dir(&f.root, "big", 10_000, None).unwrap();
        assert_eq!(l.entries.len(), MAX_LIST_LIMIT);
        let l = list_dir(&f.root, "big", 0, None).unwrap();
        assert_eq!(l.entries.len(), 1);
        assert!(l.next_cursor.is_some());
    }
}

#[test]
fn paging_survives_changes_between_pages() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        for n in ["a", "b", "c", "d", "e"] {
            std::fs::write(f.p(n), b"").unwrap();
        }
        let p1 = list_dir(&f.root, "", 2, None).unwrap();
        assert_eq!(p1.entries.len(), 2);
        // Remove the cursor's own entry, add one before and one after.
        std::fs::remove_file(f.p("b")).unwrap();
        std::fs::write(f.p("aa"), b"").unwrap();
        std::fs::write(f.p("f"), b"").unwrap();
        let p2 = list_dir(&f.root, "", 10, p1.next_cursor.as_deref()).unwrap();
        let names: Vec<&str> = p2.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["c", "d", "e", "f"], "{r:?}");
        assert_eq!(p2.next_cursor, None);
    }
}

#[test]
fn real_sizes_and_mtimes() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::write(f.p("file"), vec![7u8; 1234]).unwrap();
        std::fs::create_dir(f.p("dir")).unwrap();
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        std::fs::File::options()
            .write(true)
            .open(f.p("file"))
            .unwrap()
            .set_modified(when)
            .unwrap();
        let l = list_dir(&f.root, ".", 10, None).unwrap();
        assert_eq!(l.entries.len(), 2);
        let dir = &l.entries[0];
        let file = &l.entries[1];
        assert_eq!(
            (dir.kind, dir.name.as_str(), dir.size),
            (EntryKind::Dir, "dir", 0)
        );
        assert_eq!(
            (file.kind, file.name.as_str(), file.size, file.mtime_s),
            (EntryKind::File, "file", 1234, 1_600_000_000)
        );
        // A directory's mtime is real too (recent, in seconds, not clamped).
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(u64::from(dir.mtime_s) <= now && u64::from(dir.mtime_s) + 3600 > now);
    }
}

#[test]
fn listing_skips_specials_and_reports_errors() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::write(f.p("file"), b"").unwrap();
        symlink("file", f.p("link")).unwrap();
        nix::unistd::mkfifo(
            &f.p("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let l = list_dir(&f.root, "", 10, None).unwrap();
        assert_eq!(l.entries.len(), 1);
        assert_eq!(l.skipped_other, 2);
        assert_eq!(
            code(list_dir(&f.root, "file", 10, None)),
            "PATH",
            "{r:?} not a dir"
        );
        assert_eq!(code(list_dir(&f.root, "missing", 10, None)), "PATH");
        assert_eq!(code(list_dir(&f.root, "missing/deeper", 10, None)), "PATH");
        assert_eq!(code(list_dir(&f.root, "file/deeper", 10, None)), "PATH");
        assert_eq!(code(list_dir(&f.root, "", 10, Some("%%%"))), "PATH");
    }
}

#[test]
fn make_dir_semantics() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        assert_eq!(make_dir(&f.root, "new").unwrap(), MakeDir::Created);
        assert!(f.p("new").is_dir());
        assert_eq!(make_dir(&f.root, "new").unwrap(), MakeDir::AlreadyExisted);
        assert_eq!(make_dir(&f.root, "new/").unwrap(), MakeDir::AlreadyExisted);
        assert_eq!(make_dir(&f.root, "new/sub").unwrap(), MakeDir::Created);
        assert_eq!(make_dir(&f.root, ".").unwrap(), MakeDir::AlreadyExisted);
        std::fs::write(f.p("file"), b"").unwrap();
        assert_eq!(code(make_dir(&f.root, "file")), "PATH", "{r:?} over a file");
        symlink("new", f.p("link")).unwrap();
        assert_eq!(
            code(make_dir(&f.root, "link")),
            "PATH",
            "{r:?} over a symlink"
        );
        assert_eq!(
            code(make_dir(&f.root, "missing/child")),
            "PATH",
            "{r:?} no parent"
        );
        assert_eq!(code(make_dir(&f.root, "file/child")), "PATH");
        assert!(!f.p("missing").exists());
    }
}

#[test]
fn remove_dir_semantics() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::create_dir_all(f.p("empty")).unwrap();
        std::fs::create_dir_all(f.p("full/inner")).unwrap();
        std::fs::write(f.p("full/file"), b"x").unwrap();
        std::fs::write(f.p("file"), b"x").unwrap();
        remove_dir(&f.root, "empty", false).unwrap();
        assert!(!f.p("empty").exists());
        assert_eq!(
            code(remove_dir(&f.root, "full", false)),
            "PATH",
            "{r:?} not empty"
        );
        assert!(f.p("full/file").exists());
        assert_eq!(code(remove_dir(&f.root, "file", false)), "PATH");
        assert_eq!(code(remove_dir(&f.root, "file", true)), "PATH");
        assert!(f.p("file").exists());
        assert_eq!(code(remove_dir(&f.root, "missing", false)), "PATH");
        assert_eq!(code(remove_dir(&f.root, "missing", true)), "PATH");
        remove_dir(&f.root, "full", true).unwrap();
        assert!(!f.p("full").exists());
    }
}

#[test]
fn recursive_remove_does_not_follow_symlinks_out() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::create_dir_all(f.p("tree/a/b/c")).unwrap();
        std::fs::write(f.p("tree/a/file"), b"x").unwrap();
        std::fs::write(f.p("tree/a/b/c/deep"), b"x").unwrap();
        symlink(&f.outside, f.p("tree/to-outside")).unwrap();
        symlink(&f.outside, f.p("tree/a/b/to-outside")).unwrap();
        symlink(f.outside.join("subdir"), f.p("tree/a/b/c/to-subdir")).unwrap();
        symlink(f.outside.join(common::OUTSIDE_SECRET), f.p("tree/secret")).unwrap();
        symlink(f.fake_etc(), f.p("tree/etc")).unwrap();
        symlink("dangling-target", f.p("tree/dangling")).unwrap();
        nix::unistd::mkfifo(
            &f.p("tree/a/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::fs::write(f.p("keep"), b"x").unwrap();

        remove_dir(&f.root, "tree", true).unwrap();
        assert!(!f.p("tree").exists(), "{r:?}");
        assert_eq!(names_in(&f.root_path), ["keep"]);
        f.assert_outside_untouched();
    }
}

#[test]
fn rename_semantics() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::write(f.p("a"), b"A").unwrap();
        std::fs::write(f.p("b"), b"B").unwrap();
        std::fs::create_dir_all(f.p("dir/sub")).unwrap();

        // No overwrite by default: both files unchanged.
        assert_eq!(code(rename(&f.root, "a", "b", false)), "PATH", "{r:?}");
        assert_eq!(std::fs::read(f.p("a")).unwrap(), b"A");
        assert_eq!(std::fs::read(f.p("b")).unwrap(), b"B");
        assert_eq!(code(rename(&f.root, "a", "dir", false)), "PATH");

        // Overwrite when asked.
        rename(&f.root, "a", "b", true).unwrap();
        assert!(!f.p("a").exists());
        assert_eq!(std::fs::read(f.p("b")).unwrap(), b"A");

        // Across directories, and directories themselves.
        rename(&f.root, "b", "dir/sub/moved", false).unwrap();
        assert_eq!(std::fs::read(f.p("dir/sub/moved")).unwrap(), b"A");
        rename(&f.root, "dir/sub", "sub2", false).unwrap();
        assert!(f.p("sub2/moved").exists());

        // Errors.
        assert_eq!(code(rename(&f.root, "missing", "x", false)), "PATH");
        assert_eq!(code(rename(&f.root, "sub2", "missing/x", false)), "PATH");
        assert_eq!(code(rename(&f.root, "sub2", "sub2/inside", false)), "PATH");
        assert_eq!(code(rename(&f.root, "sub2", "sub2/a/b", true)), "PATH");
        assert!(f.p("sub2/moved").exists());

        // A symlink is moved as itself; its target is untouched.
        symlink(&f.outside, f.p("ln")).unwrap();
        rename(&f.root, "ln", "ln2", false).unwrap();
        assert!(
            f.p("ln2")
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_link(f.p("ln2")).unwrap(), f.outside);
        f.assert_outside_untouched();
    }
}

/// Names longer than a cursor can carry (> 95 bytes), many sharing a long prefix: the cursor
/// still fits the wire's 128 characters and pages still tile the sorted set exactly.
#[test]
fn paging_long_names_with_shared_prefixes() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::create_dir(f.p("long")).unwrap();
        let shared = "p".repeat(120);
        let mut expected = BTreeSet::new();
        for i in 0..60 {
            let name = match i % 3 {
                0 => format!("{shared}{i:03}{}", "z".repeat(100)),
                1 => format!("{}{i:03}", "q".repeat(200)),
                _ => format!("short{i:03}"),
            };
            std::fs::write(f.p(&format!("long/{name}")), b"").unwrap();
            expected.insert(name);
        }
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = list_dir(&f.root, "long", 7, cursor.as_deref()).unwrap();
            all.extend(page.entries.into_iter().map(|e| e.name));
            match page.next_cursor {
                Some(c) => {
                    assert!(c.len() <= codemantle_daemon::fs::MAX_CURSOR_CHARS, "{r:?}");
                    cursor = Some(c);
                }
                None => break,
            }
        }
        assert_eq!(all, expected.iter().cloned().collect::<Vec<_>>(), "{r:?}");

        // The cursor's own long name removed between pages: no gaps (its prefix group may
        // be offered again).
        let first = list_dir(&f.root, "long", 3, None).unwrap();
        let last = first.entries.last().unwrap().name.clone();
        assert!(last.len() > 95);
        std::fs::remove_file(f.p(&format!("long/{last}"))).unwrap();
        let mut rest = Vec::new();
        let mut cursor = first.next_cursor;
        while let Some(c) = cursor {
            let page = list_dir(&f.root, "long", 50, Some(&c)).unwrap();
            rest.extend(page.entries.into_iter().map(|e| e.name));
            cursor = page.next_cursor;
        }
        for name in expected.iter().filter(|n| **n > last) {
            assert!(rest.contains(name), "{r:?}: gap at {name}");
        }
    }
}
