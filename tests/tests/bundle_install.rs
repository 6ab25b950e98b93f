//! The air-gapped bundle: `image/build-bundle.sh` packs the binaries, units and configs with
//! `SHA256SUMS`; `install.sh --root DIR` checks the sums and lays out what the units expect.
//!
//! The bundle is built from the debug binaries `cargo test --workspace` just made
//! (`BIN_DIR`), so the test does not run a release build.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use codemantle_tests::bins::bin_path;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("command runs")
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds and unpacks the x86_64 bundle into `dir`; returns the unpacked bundle directory.
fn unpacked_bundle(dir: &Path) -> PathBuf {
    let bin_dir = bin_path("codemantle-daemon")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    ok(Command::new("bash")
        .arg(repo().join("image/build-bundle.sh"))
        .arg("x86_64")
        .env("BIN_DIR", &bin_dir)
        .env("OUT_DIR", dir));
    let tarball = std::fs::read_dir(dir)
        .expect("out dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with("-x86_64.tar.gz"))
        .expect("a tarball was built");
    // The published checksum of the tarball itself verifies.
    ok(Command::new("sha256sum")
        .arg("-c")
        .arg(format!(
            "{}.sha256",
            tarball.file_name().unwrap().to_string_lossy()
        ))
        .current_dir(dir));
    ok(Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .current_dir(dir));
    let name = tarball
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".tar.gz")
        .to_owned();
    dir.join(name)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn install_into_a_root_lays_out_what_the_units_expect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = unpacked_bundle(dir.path());
    let root = dir.path().join("root");
    let said = ok(Command::new(bundle.join("install.sh"))
        .arg("--root")
        .arg(&root));
    assert!(said.contains("installed into"), "{said}");

    for bin in [
        "codemantle-daemon",
        "codemantle-control-plane",
        "codemantle",
    ] {
        assert_eq!(mode(&root.join("usr/bin").join(bin)), 0o755, "{bin}");
    }
    for unit in [
        "codemantle-daemon.service",
        "codemantle-control-plane.service",
    ] {
        let text = std::fs::read_to_string(root.join("etc/systemd/system").join(unit)).expect(unit);
        // Every executable and writable path a unit names exists in the installed root.
        for line in text.lines() {
            if let Some(cmd) = line.strip_prefix("ExecStart=") {
                let exe = cmd.split_whitespace().next().expect("command");
                assert!(
                    root.join(exe.trim_start_matches('/')).is_file(),
                    "{unit}: {exe}"
                );
            }
            if let Some(paths) = line.strip_prefix("ReadWritePaths=") {
                for p in paths.split_whitespace() {
                    assert!(root.join(p.trim_start_matches('/')).is_dir(), "{unit}: {p}");
                }
            }
        }
    }
    assert!(root.join("usr/lib/sysusers.d/codemantle.conf").is_file());
    assert!(root.join("usr/lib/tmpfiles.d/codemantle.conf").is_file());
    // State directories are private; configs are not world-readable.
    assert_eq!(mode(&root.join("var/lib/codemantle")), 0o700);
    assert_eq!(mode(&root.join("var/lib/codemantle-cp")), 0o700);
    // The process guard's per-session HOME/TMPDIR (process.private_dir) exists and is private.
    assert_eq!(mode(&root.join("var/lib/codemantle-private")), 0o700);
    assert_eq!(mode(&root.join("etc/codemantle/daemon.toml")), 0o640);
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("sysusers wrote passwd");
    assert!(
        passwd.lines().any(|l| l.starts_with("codemantle:")),
        "{passwd}"
    );
    assert!(
        passwd.lines().any(|l| l.starts_with("codemantle-cp:")),
        "{passwd}"
    );

    // A second install keeps the operator's edited config.
    std::fs::write(
        root.join("etc/codemantle/daemon.toml"),
        "# edited by the operator\n",
    )
    .unwrap();
    ok(Command::new(bundle.join("install.sh"))
        .arg("--root")
        .arg(&root));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/codemantle/daemon.toml")).unwrap(),
        "# edited by the operator\n"
    );
}

#[test]
fn a_damaged_bundle_installs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = unpacked_bundle(dir.path());
    // One flipped byte in a binary.
    let victim = bundle.join("bin/codemantle-daemon");
    let mut bytes = std::fs::read(&victim).expect("binary");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).expect("write");

    let root = dir.path().join("root");
    let out = run(Command::new(bundle.join("install.sh"))
        .arg("--root")
        .arg(&root));
    assert!(
        !out.status.success(),
        "install of a damaged bundle must fail"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(
        !root.exists(),
        "nothing may be installed from a damaged bundle"
    );
}
