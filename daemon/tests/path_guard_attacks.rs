//! Attacks on the path guard, on the real filesystem, with both resolvers (`openat2` and the
//! per-component fallback walk). Every attempt must fail with the right wire code and leave the
//! directory outside the root untouched.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use codemantle_daemon::fs::{list_dir, make_dir, remove_dir, rename};
use codemantle_daemon::guard::path::{GuardError, RelPath, Resolver};
use common::{Fixture, OUTSIDE_SECRET, RESOLVERS, code};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

fn open_file(f: &Fixture, rel: &str) -> Result<std::os::fd::OwnedFd, GuardError> {
    let rel = RelPath::parse(rel)?;
    f.root.open_beneath(&rel, OFlag::O_RDONLY, Mode::empty())
}

#[test]
fn dotdot_escapes_are_root_errors() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::create_dir(f.p("a")).unwrap();
        for bad in [
            "..",
            "../",
            "../outside",
            "a/../../outside",
            "a/../..",
            "./../x",
        ] {
            assert_eq!(
                code(list_dir(&f.root, bad, 10, None)),
                "ROOT",
                "{r:?} list {bad}"
            );
            assert_eq!(
                code(make_dir(&f.root, &format!("{bad}/new"))),
                "ROOT",
                "{r:?} mkdir {bad}"
            );
            assert_eq!(
                code(remove_dir(&f.root, bad, true)),
                "ROOT",
                "{r:?} rmdir {bad}"
            );
            assert_eq!(
                code(rename(&f.root, "a", &format!("{bad}/a"), true)),
                "ROOT",
                "{r:?}"
            );
            assert_eq!(
                code(open_file(&f, &format!("{bad}/{OUTSIDE_SECRET}"))),
                "ROOT"
            );
        }
        // `..` that stays inside is fine (lexical normalisation).
        assert!(list_dir(&f.root, "a/..", 10, None).is_ok());
        assert!(make_dir(&f.root, "a/../b").is_ok());
        assert!(f.p("b").is_dir());
        f.assert_outside_untouched();
    }
}

#[test]
fn absolute_paths_are_path_errors() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        // Read-only probes may name real system paths; a broken guard can only read them.
        for bad in ["/", "/etc", "/etc/passwd"] {
            assert_eq!(
                code(list_dir(&f.root, bad, 10, None)),
                "PATH",
                "{r:?} {bad}"
            );
            assert_eq!(code(open_file(&f, bad)), "PATH");
        }
        // Destructive probes name only the fixture's own outside directory (see tests/common).
        let abs = f.outside.to_str().unwrap().to_owned();
        let abs_etc = f.fake_etc().to_str().unwrap().to_owned();
        for bad in [abs.as_str(), abs_etc.as_str()] {
            assert_eq!(
                code(list_dir(&f.root, bad, 10, None)),
                "PATH",
                "{r:?} {bad}"
            );
            assert_eq!(code(make_dir(&f.root, &format!("{bad}/x"))), "PATH");
            assert_eq!(code(remove_dir(&f.root, bad, true)), "PATH");
            assert_eq!(
                code(remove_dir(&f.root, &format!("{bad}/passwd"), false)),
                "PATH"
            );
            assert_eq!(
                code(rename(&f.root, &format!("{bad}/passwd"), "x", true)),
                "PATH"
            );
            assert_eq!(
                code(rename(&f.root, "x", &format!("{bad}/y"), true)),
                "PATH"
            );
            assert_eq!(code(open_file(&f, bad)), "PATH");
        }
        f.assert_outside_untouched();
    }
}

#[test]
fn symlink_to_outside_is_never_followed() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        symlink(&f.outside, f.p("evil")).unwrap();
        // `ln -s /etc etc`, aimed at the fixture's stand-in (see tests/common: never a real
        // system path).
        symlink(f.fake_etc(), f.p("etc")).unwrap();
        symlink("../outside", f.p("relative-evil")).unwrap();
        symlink(f.outside.join(OUTSIDE_SECRET), f.p("secret-link")).unwrap();
        std::fs::create_dir(f.p("a")).unwrap();

        for link in ["evil", "etc", "relative-evil"] {
            assert_eq!(
                code(list_dir(&f.root, link, 10, None)),
                "ROOT",
                "{r:?} list {link}"
            );
            assert_eq!(
                code(list_dir(&f.root, &format!("{link}/subdir"), 10, None)),
                "ROOT"
            );
            assert_eq!(
                code(make_dir(&f.root, &format!("{link}/new"))),
                "ROOT",
                "{r:?}"
            );
            assert_eq!(
                code(rename(&f.root, "a", &format!("{link}/a"), false)),
                "ROOT"
            );
            assert_eq!(
                code(rename(
                    &f.root,
                    &format!("{link}/{OUTSIDE_SECRET}"),
                    "stolen",
                    false
                )),
                "ROOT"
            );
            assert_eq!(
                code(remove_dir(&f.root, &format!("{link}/subdir"), true)),
                "ROOT"
            );
        }
        assert_eq!(code(open_file(&f, "etc/passwd")), "ROOT");
        assert_eq!(
            code(open_file(&f, &format!("evil/{OUTSIDE_SECRET}"))),
            "ROOT"
        );
        assert_eq!(code(open_file(&f, "relative-evil/outside-secret")), "ROOT");
        assert_eq!(code(open_file(&f, "secret-link")), "ROOT");

        // Removing the link itself: rmdir says "not a directory"; nothing behind it is touched.
        assert_eq!(code(remove_dir(&f.root, "evil", false)), "PATH");
        assert_eq!(code(remove_dir(&f.root, "evil", true)), "PATH");
        assert!(
            f.p("evil")
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );

        // Listings never show symlinks.
        let l = list_dir(&f.root, "", 100, None).unwrap();
        let names: Vec<&str> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a"]);
        assert_eq!(l.skipped_other, 4);
        assert!(!f.p("stolen").exists());
        f.assert_outside_untouched();
    }
}

#[test]
fn symlink_in_a_middle_component() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::create_dir_all(f.p("a/b")).unwrap();
        symlink(&f.outside, f.p("a/b/mid")).unwrap();
        for p in ["a/b/mid/subdir", "a/b/mid/subdir/x", "a/b/mid/./subdir"] {
            assert_eq!(code(list_dir(&f.root, p, 10, None)), "ROOT", "{r:?} {p}");
            assert_eq!(code(make_dir(&f.root, p)), "ROOT", "{r:?} {p}");
        }
        assert_eq!(code(remove_dir(&f.root, "a/b/mid/subdir", false)), "ROOT");
        // `mid/..` is normalised lexically to `a/b`, never resolved through the link.
        let l = list_dir(&f.root, "a/b/mid/..", 10, None).unwrap();
        assert!(l.entries.is_empty());
        f.assert_outside_untouched();
    }
}

#[test]
fn in_tree_symlinks_follow_only_with_openat2() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::create_dir_all(f.p("real/inner")).unwrap();
        symlink("real", f.p("rel-link")).unwrap();
        // Climbs to the root and back down: stays beneath it the whole way.
        symlink("../../real", f.p("real/inner/up-link")).unwrap();
        symlink(f.p("real"), f.p("abs-link")).unwrap();
        let rel = list_dir(&f.root, "rel-link", 10, None);
        let up = list_dir(&f.root, "real/inner/up-link", 10, None);
        match r {
            Resolver::Openat2 => {
                assert_eq!(rel.unwrap().entries[0].name, "inner");
                assert_eq!(up.unwrap().entries[0].name, "inner");
            }
            _ => {
                let e = rel.unwrap_err();
                assert_eq!(e.wire_code().as_str(), "ROOT");
                assert!(e.to_string().contains("openat2"), "{e}");
                assert_eq!(code(up), "ROOT");
            }
        }
        // An absolute symlink is refused even when it points back inside.
        assert_eq!(
            code(list_dir(&f.root, "abs-link", 10, None)),
            "ROOT",
            "{r:?}"
        );
    }
}

#[test]
fn non_utf8_names_are_skipped_and_counted() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        let bad_dir = OsStr::from_bytes(b"dir-\xff");
        let bad_file = OsStr::from_bytes(b"file-\xfe\xfd");
        std::fs::create_dir(f.root_path.join(bad_dir)).unwrap();
        std::fs::write(f.root_path.join(bad_dir).join(bad_file), b"x").unwrap();
        std::fs::write(f.root_path.join(bad_file), b"x").unwrap();
        std::fs::write(f.p("good"), b"x").unwrap();

        let l = list_dir(&f.root, "", 10, None).unwrap();
        assert_eq!(l.entries.len(), 1);
        assert_eq!(l.entries[0].name, "good");
        assert_eq!(l.skipped_non_utf8, 2);

        // The lossy spelling does not address the file.
        assert_eq!(code(list_dir(&f.root, "dir-\u{fffd}", 10, None)), "PATH");
        // The parent can still be removed recursively, names and all.
        std::fs::create_dir(f.p("holder")).unwrap();
        std::fs::rename(f.root_path.join(bad_dir), f.p("holder/inner")).unwrap();
        remove_dir(&f.root, "holder", true).unwrap();
        assert!(!f.p("holder").exists());
    }
}

#[test]
fn over_long_and_nul_paths_are_path_errors() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        let c256 = "x".repeat(256);
        let c255 = "y".repeat(255);
        let long = "a/".repeat(2048) + "b"; // 4097 bytes
        assert_eq!(long.len(), 4097);
        for bad in [c256.as_str(), &format!("a/{c256}/b"), long.as_str(), "a\0b"] {
            assert_eq!(code(list_dir(&f.root, bad, 10, None)), "PATH", "{r:?}");
            assert_eq!(code(make_dir(&f.root, bad)), "PATH");
            assert_eq!(code(remove_dir(&f.root, bad, false)), "PATH");
            assert_eq!(code(rename(&f.root, "x", bad, false)), "PATH");
        }
        assert!(matches!(
            RelPath::parse(&long),
            Err(GuardError::PathTooLong { len: 4097 })
        ));
        // 255 bytes is allowed and works on the real filesystem.
        make_dir(&f.root, &c255).unwrap();
        assert!(f.p(&c255).is_dir());
    }
}

#[test]
fn root_itself_is_protected() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        for root in ["", ".", "./", "a/.."] {
            assert_eq!(code(remove_dir(&f.root, root, false)), "ROOT");
            assert_eq!(code(remove_dir(&f.root, root, true)), "ROOT");
            assert_eq!(code(rename(&f.root, root, "x", true)), "ROOT");
            assert_eq!(code(rename(&f.root, "x", root, true)), "ROOT");
        }
        assert!(f.root_path.is_dir());
    }
}

/// A thread swaps `d` between a real directory and a symlink to outside (atomically, with
/// RENAME_EXCHANGE) while this thread lists, mkdirs, renames and removes through `d`. Whatever
/// interleaving happens, nothing may be created, renamed or removed outside, and no listing
/// may show an outside name.
#[test]
fn swap_race_never_escapes() {
    for r in RESOLVERS {
        let f = Fixture::new(r);
        std::fs::create_dir(f.p("d")).unwrap();
        std::fs::write(f.p("d/inside-file"), b"in").unwrap();
        symlink(&f.outside, f.p("spare")).unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let stop = stop.clone();
            let d = f.p("d");
            let spare = f.p("spare");
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &d,
                        nix::fcntl::AT_FDCWD,
                        &spare,
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    )
                    .expect("exchange");
                    swaps += 1;
                }
                swaps
            })
        };

        let (mut ok, mut refused) = (0u32, 0u32);
        let mut tally = |res: Result<(), GuardError>| match res {
            Ok(()) => ok += 1,
            Err(e) => {
                // Refusals are ROOT (escape/symlink) or PATH (the entry moved away mid-way).
                let c = e.wire_code().as_str().to_owned();
                assert!(c == "ROOT" || c == "PATH", "{r:?}: unexpected {e}");
                refused += 1;
            }
        };
        for i in 0..1500 {
            let listed = list_dir(&f.root, "d", 256, None).map(|l| {
                for e in &l.entries {
                    assert_ne!(e.name, OUTSIDE_SECRET, "{r:?}: listing leaked outside");
                    assert_ne!(e.name, "subdir", "{r:?}: listing leaked outside");
                }
            });
            tally(listed);
            tally(make_dir(&f.root, &format!("d/m{i}")).map(drop));
            tally(rename(
                &f.root,
                &format!("d/m{i}"),
                &format!("d/n{i}"),
                false,
            ));
            tally(rename(&f.root, "d/inside-file", "d/inside-file", true));
            tally(remove_dir(&f.root, &format!("d/n{i}"), true));
            tally(remove_dir(&f.root, "d/subdir", true));
            tally(
                open_file(&f, &format!("d/{OUTSIDE_SECRET}"))
                    .map(|_| panic!("{r:?}: opened the outside secret")),
            );
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        eprintln!("{r:?}: {swaps} swaps, {ok} ops succeeded, {refused} refused");
        assert!(ok > 0 && refused > 0, "{r:?}: the race did not interleave");
        f.assert_outside_untouched();
    }
}
